"""A small deterministic text corpus and tiny training settings shared by the training tests."""

from __future__ import annotations

import random
from pathlib import Path

from mambakit.training import TrainConfig


def write_corpus(directory: Path, n_files: int = 40, seed: int = 0) -> Path:
    """``n_files`` files of repetitive pseudo-Python (learnable quickly) under ``directory``."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "items", "result"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(60):
            a, b = rng.choice(names), rng.choice(names)
            lines.append(f"def {a}_{rng.randint(0, 9)}({b}):\n    return {b} + {rng.randint(0, 99)}\n")
        (directory / f"module_{i:03d}.py").write_text("".join(lines))
    return directory


def tiny_settings(data: Path, out: Path, **overrides) -> TrainConfig:
    fields = dict(preset="tiny", data=str(data), out=str(out), seq_len=32, batch_size=4, max_steps=8, warmup_steps=2,
                  eval_every=4, eval_windows=4, log_every=1, sample_tokens=0, lr=1e-2, min_lr=1e-3)
    fields.update(overrides)
    return TrainConfig(**fields)
