"""Synthetic tasks from the Mamba papers: selective copying, induction heads, multi-query
associative recall (MQAR, from Zoology). ``run_task(name, ...)`` trains a small model on one,
evaluates its accuracy, and writes results.json and a PNG.

Every generator returns ``(inputs, targets)``, both (batch, length) int64: ``targets[b, t]`` is the
token the model must predict after reading ``inputs[b, : t + 1]``, or ``IGNORE`` where nothing is
asked. Token 0 is reserved (blank / padding) in every task.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoints import atomic_write
from ..models import MambaConfig, MambaLM
from .config import LAYERS

IGNORE = -100


def selective_copying(batch: int, context: int = 64, n_memorize: int = 8, vocab: int = 10,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba paper, selective copying: ``n_memorize`` data tokens (1 .. vocab-2) scattered at random
    positions among blanks (0) in a context of ``context`` tokens, then a separator (vocab-1) and
    the data tokens again; the model must reproduce them in order.

    Returns inputs, targets (batch, context + n_memorize): the targets are the data tokens from
    the separator on (teacher forcing), IGNORE before.
    """
    positions = torch.rand(batch, context, generator=generator).argsort(dim=1)[:, :n_memorize].sort(dim=1).values
    data = torch.randint(1, vocab - 1, (batch, n_memorize), generator=generator)
    sequence = torch.zeros(batch, context + 1 + n_memorize, dtype=torch.int64)
    sequence.scatter_(1, positions, data)
    sequence[:, context] = vocab - 1
    sequence[:, context + 1:] = data
    targets = torch.full_like(sequence, IGNORE)
    targets[:, context:-1] = data
    return sequence[:, :-1], targets[:, :-1]


def induction_heads(batch: int, length: int = 256, vocab: int = 16,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba paper, induction heads: random tokens (1 .. vocab-2) with the trigger (vocab-1) once
    somewhere followed by an answer token, and the trigger again as the last token; the model must
    predict the answer there.

    Returns inputs, targets (batch, length): targets is IGNORE except at the last position.
    """
    if length < 4:
        raise ValueError(f"length: expected >= 4, got {length}")
    trigger = vocab - 1
    inputs = torch.randint(1, vocab - 1, (batch, length), generator=generator)
    where = torch.randint(0, length - 2, (batch,), generator=generator)
    rows = torch.arange(batch)
    answer = inputs[rows, where + 1].clone()
    inputs[rows, where] = trigger
    inputs[:, -1] = trigger
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = answer
    return inputs, targets


def associative_recall(batch: int, n_pairs: int = 16, n_queries: int = 16, length: int = 128, vocab: int = 128,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoology's multi-query associative recall: ``n_pairs`` key-value pairs (distinct keys from
    1 .. vocab/2 - 1, values from vocab/2 .. vocab-1) side by side, then blanks with ``n_queries``
    of the keys placed at random positions; after each queried key the model must predict its value.

    Returns inputs, targets (batch, length): the value at each query key's position, IGNORE elsewhere.
    """
    half = vocab // 2
    if n_pairs > half - 1 or n_queries > n_pairs or 2 * n_pairs + n_queries > length:
        raise ValueError(f"associative_recall: {n_pairs} pairs and {n_queries} queries do not fit vocab {vocab} / "
                         f"length {length}")
    keys = torch.rand(batch, half - 1, generator=generator).argsort(dim=1)[:, :n_pairs] + 1
    values = torch.randint(half, vocab, (batch, n_pairs), generator=generator)
    inputs = torch.zeros(batch, length, dtype=torch.int64)
    inputs[:, 0:2 * n_pairs:2], inputs[:, 1:2 * n_pairs:2] = keys, values
    asked = torch.rand(batch, n_pairs, generator=generator).argsort(dim=1)[:, :n_queries]
    free = length - 2 * n_pairs
    slots = torch.rand(batch, free, generator=generator).argsort(dim=1)[:, :n_queries] + 2 * n_pairs
    inputs.scatter_(1, slots, keys.gather(1, asked))
    targets = torch.full_like(inputs, IGNORE)
    targets.scatter_(1, slots, values.gather(1, asked))
    return inputs, targets


@dataclass
class TaskSpec:
    """A task's generator settings and the model and budget that learn it on a CPU in minutes.
    ``n_items``: tokens to copy (selective copying) or key-value pairs, all queried (MQAR)."""

    vocab: int
    train_len: int
    n_items: int
    steps: int
    batch_size: int
    lr: float
    d_model: int
    n_layer: int


TASKS = {
    "selective-copying": TaskSpec(vocab=10, train_len=64, n_items=8, steps=800, batch_size=32, lr=3e-3, d_model=128, n_layer=2),
    # Induction heads form abruptly (loss at chance, then ~0 within ~50 steps), at a step that
    # varies from run to run.
    "induction-heads": TaskSpec(vocab=16, train_len=256, n_items=1, steps=600, batch_size=32, lr=1e-2, d_model=64, n_layer=2),
    "mqar": TaskSpec(vocab=64, train_len=64, n_items=8, steps=600, batch_size=32, lr=3e-3, d_model=128, n_layer=2),
}


def make_batch(name: str, spec: TaskSpec, batch: int, length: int, generator: torch.Generator):
    """One batch of task ``name`` at sequence length ``length`` (inputs, targets)."""
    if name == "selective-copying":
        return selective_copying(batch, context=length, n_memorize=spec.n_items, vocab=spec.vocab, generator=generator)
    if name == "induction-heads":
        return induction_heads(batch, length=length, vocab=spec.vocab, generator=generator)
    return associative_recall(batch, n_pairs=spec.n_items, n_queries=spec.n_items, length=length, vocab=spec.vocab, generator=generator)


@torch.no_grad()
def accuracy(model: MambaLM, name: str, spec: TaskSpec, length: int, n_examples: int, seed: int, device) -> float:
    """Share of asked positions predicted exactly (greedy), over ``n_examples`` fresh sequences."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    correct = total = 0
    per_batch = max(1, min(64, (1 << 16) // length))
    for i in range(0, n_examples, per_batch):
        inputs, targets = make_batch(name, spec, min(per_batch, n_examples - i), length, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        prediction = model(inputs).argmax(-1)
        asked = targets != IGNORE
        correct += int((prediction[asked] == targets[asked]).sum())
        total += int(asked.sum())
    model.train()
    return correct / total


def run_task(name: str, layer: str = "mamba2", out: str = "runs/task", steps: int | None = None,
             max_test_len: int = 1 << 14, seed: int = 0, device: str | None = None) -> dict:
    """Train a small ``layer`` model on task ``name``, print and return its accuracy table.

    Induction heads are trained at length 256 and tested at every power of two from 64 to
    ``max_test_len`` (length extrapolation). Writes OUT/results.json and OUT/accuracy.png.
    """
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    if layer not in LAYERS:
        raise ValueError(f"--layer: expected one of {sorted(LAYERS)}, got {layer!r}")
    if max_test_len < 64 or max_test_len & (max_test_len - 1):
        raise ValueError(f"--max-test-len: expected a power of two >= 64, got {max_test_len}")
    spec = TASKS[name]
    steps = spec.steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"--steps: expected a positive integer, got {steps}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flush = device.type == "cpu" and torch.set_flush_denormal(True)  # as in trainer.train: subnormals are slow
    try:
        return _run(name, spec, layer, out, steps, max_test_len, seed, device)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _run(name: str, spec: TaskSpec, layer: str, out: str, steps: int, max_test_len: int, seed: int,
         device: torch.device) -> dict:
    torch.manual_seed(seed)
    mixer = {"layer": LAYERS[layer], "d_state": 16}
    if layer != "mamba1":
        mixer.update(headdim=16, chunk_size=64)
    model = MambaLM(MambaConfig(d_model=spec.d_model, n_layer=spec.n_layer, vocab_size=spec.vocab, ssm_cfg=mixer)).to(device)
    # A constant rate, no warmup: with warmup + cosine, or warmup alone, induction heads did not
    # form within 600-1200 steps in our CPU runs; with this they formed at step ~330.
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(steps):
        inputs, targets = make_batch(name, spec, spec.batch_size, spec.train_len, generator)
        logits = model(inputs.to(device))
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0:
            print(f"{name} step {step + 1}/{steps}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    lengths = [spec.train_len]
    if name == "induction-heads":
        lengths = sorted({1 << k for k in range(6, int(math.log2(max_test_len)) + 1)} | {spec.train_len})
    results = {length: accuracy(model, name, spec, length, 128 if length <= 4096 else 16, seed + 1, device)
               for length in lengths}
    summary = {"task": name, "layer": layer, "train_len": spec.train_len, "steps": steps, "seed": seed,
               "seconds": time.perf_counter() - started, "spec": asdict(spec),
               "accuracy": {str(k): v for k, v in results.items()}}
    print(f"{name} ({layer}, trained at length {spec.train_len}, {steps} steps)")
    print("| test length | accuracy |\n| ---: | ---: |")
    for length, acc in results.items():
        print(f"| {length}{' (train)' if length == spec.train_len else ''} | {acc:.3f} |")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2) + "\n"))
    _plot(out_dir / "accuracy.png", summary)
    return summary


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(k) for k in summary["accuracy"]]
    values = list(summary["accuracy"].values())
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if len(lengths) > 1:
        ax.plot(lengths, values, "o-")
        ax.set_xscale("log", base=2)
        ax.axvline(summary["train_len"], ls="--", c="gray", label="training length")
        ax.legend()
    else:
        ax.bar([str(lengths[0])], values)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("test sequence length")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{summary['task']} ({summary['layer']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
