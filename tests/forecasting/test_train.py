import pytest

from mambakit.forecasting import ForecastConfig, run_forecast
from mambakit.forecasting.train import LR_SCHEDULES

from .conftest import BORDERS


@pytest.mark.parametrize("name, after_epochs", [
    # Time-Series-Library adjust_learning_rate(epoch + 1) after each epoch: type1 = lr * 0.5^(k-1),
    # type3 = lr for k < 3, else lr * 0.9^(k-3), k the number of completed epochs.
    ("type1", [1.0, 0.5, 0.25, 0.125]),
    ("type3", [1.0, 1.0, 1.0, 0.9, 0.81]),
])
def test_lr_schedules_match_the_benchmark_code(name, after_epochs):
    factors = [LR_SCHEDULES[name](k) for k in range(1, len(after_epochs) + 1)]
    assert factors == pytest.approx(after_epochs)


def test_run_forecast_steps_the_rate_by_the_schedule(periodic_csv, tmp_path, capsys):
    run_forecast(ForecastConfig(data=str(periodic_csv), model="dlinear", lookback=24, horizon=8, epochs=4,
                                patience=10, lr=1e-3, seed=0, out=str(tmp_path / "run"), borders=BORDERS,
                                max_train_batches=2))
    rates = [float(line.rsplit("lr ", 1)[1].rstrip(")")) for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch ")]
    # the printed rate is the one the epoch trained with: type1 (dlinear's) keeps 2 epochs, then halves
    assert rates == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])


def test_first_epoch_rate_and_beta1(periodic_csv, tmp_path, capsys, monkeypatch):
    # The Bi-Mamba+ authors' effective optimizer: lr / 25 for the first epoch, then the schedule's
    # rates (dlinear's type1: lr, then lr / 2); Adam's beta1 0.95 throughout.
    import torch

    betas = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: (betas.append(self.param_groups[0]["betas"]),
                                                                         step(self, *a, **k))[1])
    record = run_forecast(ForecastConfig(data=str(periodic_csv), model="dlinear", lookback=24, horizon=8, epochs=3,
                                         patience=10, lr=1e-3, seed=0, out=str(tmp_path / "run"), borders=BORDERS,
                                         max_train_batches=2, first_epoch_lr=0.04, beta1=0.95))
    rates = [float(line.rsplit("lr ", 1)[1].rstrip(")")) for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch ")]
    assert rates == pytest.approx([4e-5, 1e-3, 5e-4])
    assert betas and all(b == (0.95, 0.999) for b in betas)
    assert record["first_epoch_lr"] == 0.04 and record["beta1"] == 0.95


@pytest.mark.parametrize("field, value", [("first_epoch_lr", 0.0), ("first_epoch_lr", float("nan")), ("beta1", 1.0),
                                          ("beta1", -0.1)])
def test_bad_trainer_settings_are_refused(periodic_csv, tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        run_forecast(ForecastConfig(data=str(periodic_csv), model="dlinear", lookback=24, horizon=8, epochs=1,
                                    out=str(tmp_path / "run"), borders=BORDERS, **{field: value}))
