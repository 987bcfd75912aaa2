"""Synthetic CSVs in the long-horizon format for the forecasting tests."""

from datetime import datetime, timedelta

import pytest
import torch

BORDERS = (360, 480, 600)  # train/val/test rows of the synthetic series


def write_csv(path, values: torch.Tensor, names=None) -> None:
    """values (t, n) -> a CSV with an hourly 'date' column from 2016-07-01 00:00."""
    names = names or [f"v{i}" for i in range(values.shape[1] - 1)] + ["OT"]
    start = datetime(2016, 7, 1)
    lines = ["date," + ",".join(names)]
    for i, row in enumerate(values.tolist()):
        stamp = (start + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(stamp + "," + ",".join(f"{v:.6f}" for v in row))
    path.write_text("\n".join(lines) + "\n")


def periodic(rows: int, n_vars: int, seed: int) -> torch.Tensor:
    """(rows, n_vars): daily sines with random phases, amplitudes and offsets, plus 5% noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(rows, dtype=torch.float32)[:, None]
    phase = torch.rand(n_vars, generator=g) * 6.28
    amp = 1 + torch.rand(n_vars, generator=g) * 4
    offset = torch.randn(n_vars, generator=g) * 10
    return offset + amp * torch.sin(2 * torch.pi * t / 24 + phase) + 0.05 * amp * torch.randn(rows, n_vars, generator=g)


@pytest.fixture
def periodic_csv(tmp_path, request):
    """A 600-row, 3-variable periodic CSV, seeded from the test's name (fresh per test)."""
    seed = sum(map(ord, request.node.name))
    path = tmp_path / "periodic.csv"
    write_csv(path, periodic(600, 3, seed))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a loaded 2-core machine a second
    thread's spin-waits made the training tests ~6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
