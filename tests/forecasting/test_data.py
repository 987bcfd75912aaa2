import pytest
import torch

from mambakit.forecasting.data import Windows, ett_splits, mse_mae, read_csv
from mambakit.forecasting.train import _batches

from .conftest import BORDERS, periodic, write_csv


def test_read_csv_values_and_time_features(tmp_path):
    values = periodic(50, 4, seed=11)
    write_csv(tmp_path / "a.csv", values, names=["a", "b", "c", "OT"])
    series = read_csv(tmp_path / "a.csv")
    assert series.columns == ["a", "b", "c", "OT"]
    torch.testing.assert_close(series.values, values, atol=1e-5, rtol=0)
    # row 13 is 2016-07-01 13:00, a Friday (weekday 4), day 1 of the month, day 183 of the year
    expected = torch.tensor([13 / 23 - 0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5])
    torch.testing.assert_close(series.time_features[13], expected)


@pytest.mark.parametrize("text, match", [
    ("time,a\n2016-07-01 00:00:00,1\n", "first column is 'date'"),
    ("date\n2016-07-01 00:00:00\n", "at least one variable"),
    ("date,a,b\n2016-07-01 00:00:00,1\n", "line 2 has 2 fields"),
    ("date,a\n2016-07-01 00:00:00,x\n", "line 2"),
    ("date,a\n", "no data rows"),
], ids=["no-date", "no-variables", "short-row", "not-a-number", "empty"])
def test_read_csv_rejects_bad_files(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_csv(path)
    with pytest.raises(ValueError, match="path"):
        read_csv(tmp_path / "missing.csv")


def test_ett_splits_protocol(periodic_csv):
    series = read_csv(periodic_csv)
    L = 48
    s = ett_splits(series, L, BORDERS)
    raw = series.values
    mean, std = raw[:360].mean(0), raw[:360].std(0, unbiased=False)
    assert (s.train.shape[0], s.val.shape[0], s.test.shape[0]) == (360, 480 - 360 + L, 600 - 480 + L)
    torch.testing.assert_close(s.mean, mean)
    torch.testing.assert_close(s.val, (raw[360 - L:480] - mean) / std)  # training statistics, val starts L early
    torch.testing.assert_close(s.test, (raw[480 - L:600] - mean) / std)
    torch.testing.assert_close(s.train.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.test_time, series.time_features[480 - L:600])


@pytest.mark.parametrize("lookback, borders, match", [
    (0, BORDERS, "lookback"), (48, (360, 300, 600), "borders"), (48, (360, 480, 601), "borders"),
    (400, BORDERS, "borders"),
], ids=["lookback-0", "unordered", "past-end", "lookback-too-long"])
def test_ett_splits_rejects_bad_arguments(periodic_csv, lookback, borders, match):
    with pytest.raises(ValueError, match=match):
        ett_splits(read_csv(periodic_csv), lookback, borders)


def test_ett_splits_rejects_constant_variable(tmp_path):
    values = periodic(600, 2, seed=3)
    values[:, 1] = 7.0
    write_csv(tmp_path / "c.csv", values)
    with pytest.raises(ValueError, match=r"\['OT'\] are constant"):
        ett_splits(read_csv(tmp_path / "c.csv"), 24, BORDERS)


def test_windows_are_views_in_order():
    g = torch.Generator().manual_seed(5)
    series, times = torch.randn(37, 3, generator=g), torch.randn(37, 4, generator=g)
    w = Windows(series, 10, 5, times)
    assert len(w) == 37 - 10 - 5 + 1
    x, y, xt = w[7]
    torch.testing.assert_close(x, series[7:17])
    torch.testing.assert_close(y, series[17:22])
    torch.testing.assert_close(xt, times[7:17])
    assert x.untyped_storage().data_ptr() == series.untyped_storage().data_ptr()
    torch.testing.assert_close(w[-1][1], series[-5:])
    with pytest.raises(IndexError):
        w[len(w)]


def test_batches_gather_the_windows():
    g = torch.Generator().manual_seed(6)
    series, times = torch.randn(41, 2, generator=g), torch.randn(41, 4, generator=g)
    w = Windows(series, 8, 3, times)
    order = torch.randperm(len(w), generator=torch.Generator().manual_seed(1))
    batches = list(_batches(w, 4, torch.Generator().manual_seed(1), "cpu"))
    assert sum(b[0].shape[0] for b in batches) == len(w)
    x, y, xt = batches[1]
    for j, i in enumerate(order[4:8].tolist()):
        torch.testing.assert_close((x[j], y[j], xt[j]), w[i])


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(series=torch.zeros(10, dtype=torch.long)), TypeError, "series"),
    (dict(horizon=0), ValueError, "horizon"),
    (dict(lookback=8, horizon=8), ValueError, "cannot hold one window"),
    (dict(time_features=torch.zeros(5, 4)), ValueError, "time_features"),
], ids=["int-series", "horizon-0", "too-short", "time-rows"])
def test_windows_reject_bad_arguments(kwargs, error, match):
    args = dict(series=torch.zeros(10, 2), lookback=4, horizon=2) | kwargs
    with pytest.raises(error, match=match):
        Windows(**args)


def test_mse_mae():
    g = torch.Generator().manual_seed(8)
    pred, target = torch.randn(5, 4, 3, generator=g), torch.randn(5, 4, 3, generator=g)
    mse, mae = mse_mae(pred, target)
    assert mse == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-6)
    assert mae == pytest.approx(float((pred - target).abs().mean()), rel=1e-6)
    with pytest.raises(ValueError, match="pred"):
        mse_mae(pred[:2], target)
