"""benchmarks/forecasting.py: the authors'-script settings and how a grid run records them."""

import json

import pytest

from benchmarks import forecasting
from tests.forecasting.conftest import periodic, write_csv


def test_authors_script_settings_split_into_trainer_and_model():
    trainer, model = forecasting.authors_script("bi-mamba+", "ETTh1", 720)
    assert trainer == dict(lr=1e-4, first_epoch_lr=0.04, beta1=0.95)
    assert model == dict(dropout=0.1, patch_padding="to-multiple")
    trainer, model = forecasting.authors_script("bi-mamba+", "ETTh2", 96)
    assert trainer["lr"] == 2e-4 and model["patch_len"] == 24 and model["stride"] == 12
    with pytest.raises(ValueError, match="no settings for s-mamba on ETTh1"):
        forecasting.authors_script("s-mamba", "ETTh1", 96)


def test_authors_script_run_is_recorded_with_its_settings(tmp_path, monkeypatch):
    # An ETT-sized synthetic file named ETTh1.csv, one optimizer step: the record must carry the
    # script's learning rate, dropout, patching and optimizer, under its own variant.
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "ETTh1.csv"
    write_csv(data, periodic(14400, 3, seed=5))
    forecasting.main(["--data", str(data), "--models", "bi-mamba+", "--horizons", "336", "--seeds", "0",
                      "--epochs", "1", "--max-train-batches", "1", "--authors-script", "--results", str(tmp_path)])
    (record,) = json.loads((tmp_path / "forecasting.json").read_text())
    assert record["variant"] == "authors-script" and record["lr"] == 2e-4
    assert record["first_epoch_lr"] == 0.04 and record["beta1"] == 0.95
    assert record["model_options"]["patch_padding"] == "to-multiple" and record["model_options"]["dropout"] == 0.2
    assert "first_epoch_lr=0.04" in (tmp_path / "forecasting.md").read_text()


def test_authors_script_is_refused_with_a_search(tmp_path):
    with pytest.raises(ValueError, match="--authors-script: not with --search"):
        forecasting.main(["--data", str(tmp_path / "ETTh1.csv"), "--models", "bi-mamba+", "--horizons", "720",
                          "--authors-script", "--search", "lr=1e-4,2e-4", "--results", str(tmp_path)])
