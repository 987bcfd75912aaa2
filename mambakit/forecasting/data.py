"""Long-horizon forecasting data: the standard CSV format, the ETT split protocol, windows, metrics.

The CSV format of the long-horizon benchmarks (ETT, Weather, Electricity, ...): a header row, a
first column ``date`` ("YYYY-MM-DD HH:MM:SS"), then one numeric column per variable. Files are read
from a path the caller gives; nothing is downloaded.

ETT protocol (Zhou et al., Informer; used by S-Mamba and Bi-Mamba+): train/val/test = 12/4/4
months of hourly rows, i.e. rows [0, 8640), [8640 - L, 11520), [11520 - L, 14400) for look-back L
(the val/test splits start L rows early so their first window's target begins at the boundary);
every variable standardised with the mean and standard deviation of the training rows; MSE and MAE
on the standardised test windows.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

ETT_BORDERS = (8640, 11520, 14400)  # 12, 4, 4 months of 30 days x 24 hours


@dataclass
class Series:
    """A multivariate series read from a CSV.

    values: (t, n) float32, one column per variable; columns: the n variable names;
    time_features: (t, 4) float32 calendar features in [-0.5, 0.5] (hour of day, day of week,
    day of month, day of year; the ``timeF`` encoding of the long-horizon benchmarks).
    """

    values: torch.Tensor
    columns: list[str]
    time_features: torch.Tensor


def _time_features(stamp: datetime) -> list[float]:
    day_of_year = stamp.timetuple().tm_yday
    return [stamp.hour / 23.0 - 0.5, stamp.weekday() / 6.0 - 0.5, (stamp.day - 1) / 30.0 - 0.5,
            (day_of_year - 1) / 365.0 - 0.5]


def read_csv(path) -> Series:
    """Read a long-horizon CSV (``date`` column first, then numeric variables).

    Args:
        path: str or Path of the file.

    Returns: a :class:`Series` with values (t, n) float32.

    Raises ValueError naming ``path`` for a missing file, a first column other than ``date``, no
    variables, a row of the wrong length, or a value that is not a number.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path: {path} is not a file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip().lower() != "date":
        raise ValueError(f"path: {path}: expected a header whose first column is 'date'")
    header = [name.strip() for name in rows[0]]
    if len(header) < 2:
        raise ValueError(f"path: {path}: expected at least one variable column after 'date'")
    values, stamps = [], []
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"path: {path}: line {i} has {len(row)} fields, expected {len(header)}")
        try:
            stamps.append(_time_features(datetime.fromisoformat(row[0].strip())))
            values.append([float(v) for v in row[1:]])
        except ValueError as err:
            raise ValueError(f"path: {path}: line {i}: {err}") from None
    if not values:
        raise ValueError(f"path: {path}: no data rows")
    return Series(torch.tensor(values, dtype=torch.float32), header[1:],
                  torch.tensor(stamps, dtype=torch.float32))


@dataclass
class Splits:
    """Standardised train/val/test series (each (t_split, n)) with their time features and the
    training statistics mean, std (n,)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    train_time: torch.Tensor
    val_time: torch.Tensor
    test_time: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def ett_splits(series: Series, lookback: int, borders: tuple[int, int, int] = ETT_BORDERS) -> Splits:
    """Split by the ETT protocol: rows [0, b0), [b0 - L, b1), [b1 - L, b2), standardised with the
    statistics of the training rows.

    Args:
        series: from :func:`read_csv`.
        lookback: L, the window's input length (positive int).
        borders: (b0, b1, b2), default (8640, 11520, 14400), the ETTh* months; pass smaller ones
            for other or synthetic data, with L < b0 < b1 < b2 <= number of rows.

    Returns: :class:`Splits`. The tensors are views (slices) of one standardised tensor.
    """
    if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback <= 0:
        raise ValueError(f"lookback: expected a positive int, got {lookback!r}")
    if len(borders) != 3 or not all(isinstance(b, int) for b in borders):
        raise ValueError(f"borders: expected three ints (b0, b1, b2), got {borders!r}")
    b0, b1, b2 = borders
    t = series.values.shape[0]
    if not lookback < b0 < b1 < b2 <= t:
        raise ValueError(f"borders: expected lookback < b0 < b1 < b2 <= rows, got lookback={lookback}, "
                         f"borders={borders}, rows={t}")
    mean = series.values[:b0].mean(0)
    std = series.values[:b0].std(0, unbiased=False)
    if (std == 0).any():
        constant = [series.columns[i] for i in torch.nonzero(std == 0).flatten().tolist()]
        raise ValueError(f"series: variables {constant} are constant on the training split; cannot standardise")
    z = (series.values - mean) / std
    tf = series.time_features
    return Splits(z[:b0], z[b0 - lookback:b1], z[b1 - lookback:b2], tf[:b0], tf[b0 - lookback:b1],
                  tf[b1 - lookback:b2], mean, std)


class Windows(torch.utils.data.Dataset):
    """Sliding (look-back, horizon) windows over one split, without copies: item i is the pair of
    views ``series[i : i + L]``, ``series[i + L : i + L + H]`` (and the time features of the
    input rows).

    Args:
        series: (t, n) float tensor. lookback: L. horizon: H. time_features: optional (t, f).

    Item: (x (L, n), y (H, n), x_time (L, f)); ``x_time`` is an empty (L, 0) tensor without time
    features. There are t - L - H + 1 windows.
    """

    def __init__(self, series: torch.Tensor, lookback: int, horizon: int, time_features: torch.Tensor | None = None):
        if not isinstance(series, torch.Tensor) or series.dim() != 2 or not series.is_floating_point():
            raise TypeError(f"series: expected a 2-D float tensor (t, n), got {getattr(series, 'shape', type(series))}")
        for name, value in (("lookback", lookback), ("horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if series.shape[0] < lookback + horizon:
            raise ValueError(f"series: {series.shape[0]} rows cannot hold one window of lookback + horizon = "
                             f"{lookback + horizon}")
        if time_features is None:
            time_features = series.new_zeros(series.shape[0], 0)
        if time_features.shape[0] != series.shape[0]:
            raise ValueError(f"time_features: expected {series.shape[0]} rows, got {time_features.shape[0]}")
        self.series, self.time_features = series, time_features
        self.lookback, self.horizon = lookback, horizon

    def __len__(self) -> int:
        return self.series.shape[0] - self.lookback - self.horizon + 1

    def __getitem__(self, i: int):
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        i %= len(self)
        mid = i + self.lookback
        return self.series[i:mid], self.series[mid:mid + self.horizon], self.time_features[i:mid]


def mse_mae(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean squared and mean absolute error over every element; pred and target of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred: expected the shape of target {tuple(target.shape)}, got {tuple(pred.shape)}")
    diff = pred.double() - target.double()
    return float(diff.pow(2).mean()), float(diff.abs().mean())
