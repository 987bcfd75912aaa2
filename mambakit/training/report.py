"""Run records: ``metrics.jsonl`` (one JSON object per logged step) and the loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..checkpoints import atomic_write

METRICS = "metrics.jsonl"
PLOT = "loss_curve.png"


class MetricsLog:
    """Appends records to OUT/metrics.jsonl; on a resumed run, records past the resumed step
    (written after the checkpoint it resumes from) are dropped first."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = Path(out) / METRICS
        if resume_step is None:
            if self.path.exists():
                self.path.unlink()
        elif self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = []
            for i, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    if i == len(lines) - 1:  # a record cut short by the interruption
                        break
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON") from None
                if record["step"] <= resume_step:
                    kept.append(line)
            text = "".join(line + "\n" for line in kept)
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(out: Path, baseline_nats: float | None = None, title: str = "") -> Path:
    """Write OUT/loss_curve.png from metrics.jsonl: train loss and held-out loss (nats/token)
    against step, with the unigram baseline as a dashed line when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out", lw=1.5)
    if baseline_nats is not None and math.isfinite(baseline_nats):
        ax.axhline(baseline_nats, ls="--", c="gray", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(out) / PLOT
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
