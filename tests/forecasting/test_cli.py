import json

import pytest

from mambakit.cli import main

from .conftest import BORDERS


def test_forecast_command(periodic_csv, tmp_path, capsys):
    out = tmp_path / "out"
    main(["forecast", "--data", str(periodic_csv), "--model", "dlinear", "--lookback", "48", "--horizon", "24",
          "--epochs", "3", "--lr", "0.01", "--batch-size", "16", "--seed", "3", "--out", str(out),
          "--borders", *map(str, BORDERS)])
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert f"test MSE {record['mse']:.4f} MAE {record['mae']:.4f}" in printed
    assert record["epochs_run"] <= 3 and record["seed"] == 3 and record["horizon"] == 24
    assert (out / "forecast.png").stat().st_size > 0


@pytest.mark.parametrize("extra, match", [
    (["--epochs", "0"], "epochs"), (["--lr", "-1"], "lr"), (["--lookback", "0"], "lookback"),
], ids=["epochs-0", "negative-lr", "lookback-0"])
def test_forecast_rejects_bad_options(periodic_csv, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        main(["forecast", "--data", str(periodic_csv), "--model", "dlinear", "--out", str(tmp_path / "o"),
              "--borders", *map(str, BORDERS), *extra])


def test_forecast_rejects_unknown_model(periodic_csv):
    with pytest.raises(SystemExit):
        main(["forecast", "--data", str(periodic_csv), "--model", "transformer"])
