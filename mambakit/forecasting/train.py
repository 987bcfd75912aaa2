"""Training and evaluation of a forecaster on one CSV: ``run_forecast(ForecastConfig(...))``.

Adam on the MSE of standardised windows (plus the model's ``regularizer`` where it has one), the
learning rate stepped after every epoch by the model's schedule (``LR_SCHEDULES``), early stopping
on validation MSE (the best epoch's weights are restored), then MSE/MAE on every test window.
Writes results.json and forecast.png into ``out``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import atomic_write
from .blocks import sra_decider
from .data import ETT_BORDERS, Windows, ett_splits, mse_mae, read_csv
from .models import MODELS, build_model

# The learning rate set after k completed epochs, as a factor of the initial rate; named and
# defined as in the long-horizon benchmark code (Time-Series-Library ``adjust_learning_rate``):
# "type1" keeps the rate for epochs 1-2, then halves it every epoch; "type3" keeps it for epochs
# 1-4, then multiplies it by 0.9 every epoch.
LR_SCHEDULES = {
    "type1": lambda epoch: 0.5 ** (epoch - 1),
    "type3": lambda epoch: 1.0 if epoch < 3 else 0.9 ** (epoch - 3),
}

# Published ETTh1 training settings (lr, batch size, epochs, patience, schedule; "type1" where not
# given) per model. Bi-Mamba+: the paper's lr with the epochs, patience and schedule defaults of the
# authors' code.
PAPER_TRAINING = {
    "s-mamba": dict(lr=7e-5, batch_size=32, epochs=10, patience=3),
    "bi-mamba+": dict(lr=4e-5, batch_size=32, epochs=60, patience=5, schedule="type3"),
    "ms-mamba": dict(lr=7e-5, batch_size=32, epochs=10, patience=3),
    "sor-mamba": dict(lr=7e-5, batch_size=32, epochs=10, patience=3),
    "mambats": dict(lr=1e-4, batch_size=32, epochs=10, patience=3),
    "spectromamba": dict(lr=7e-5, batch_size=32, epochs=10, patience=3),
    "attention-mamba": dict(lr=7e-5, batch_size=32, epochs=10, patience=3),
    "mamba-probtsf": dict(lr=7e-5, batch_size=32, epochs=10, patience=3),
    "dlinear": dict(lr=5e-3, batch_size=32, epochs=10, patience=3),
    "lstm": dict(lr=1e-3, batch_size=32, epochs=10, patience=3),
}


# Training settings a model's PAPER_TRAINING entry may leave out, and their values then.
# first_epoch_lr: the first epoch's learning rate as a factor of lr (the schedule takes over after
# it); beta1: Adam's first-moment decay. The Bi-Mamba+ authors' trainer builds a OneCycleLR it
# never steps (under their "type3" schedule); building it alone sets the rate to lr / 25 until
# the first epoch ends and Adam's beta1 to 0.95 for the whole run, which first_epoch_lr=0.04 and
# beta1=0.95 reproduce.
TRAINING_DEFAULTS = dict(schedule="type1", first_epoch_lr=1.0, beta1=0.9)


@dataclass
class ForecastConfig:
    """One training run. ``None`` for lr/batch_size/epochs/patience/first_epoch_lr/beta1 takes
    the model's PAPER_TRAINING value (else TRAINING_DEFAULTS'); ``model_overrides`` update its
    PAPER_CONFIGS settings (for Bi-Mamba+, ``channel_mixing`` defaults to the SRA decider's choice
    on the training split)."""

    data: str
    model: str = "s-mamba"
    lookback: int = 96
    horizon: int = 96
    epochs: int | None = None
    patience: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    out: str = "runs/forecast"
    device: str = "cpu"
    borders: tuple[int, int, int] = ETT_BORDERS
    max_train_batches: int | None = None  # cap on optimizer steps per epoch (quick runs, tests)
    first_epoch_lr: float | None = None
    beta1: float | None = None
    progress: bool = True
    model_overrides: dict = field(default_factory=dict)


def _batches(windows: Windows, batch_size: int, generator: torch.Generator | None, device):
    """(x (b, L, n), y (b, H, n), x_time (b, L, f)) batches gathered from unfold views of the
    split (one gather per batch, no per-window copies); shuffled when a generator is given."""
    span = windows.lookback + windows.horizon
    series = windows.series.unfold(0, span, 1)  # (W, n, L + H), a view
    times = windows.time_features[: len(windows) + windows.lookback - 1].unfold(0, windows.lookback, 1)
    order = torch.randperm(len(windows), generator=generator) if generator is not None else torch.arange(len(windows))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        w = series[idx].transpose(1, 2)  # (b, L + H, n)
        yield (w[:, :windows.lookback].to(device), w[:, windows.lookback:].to(device),
               times[idx].transpose(1, 2).to(device))


@torch.no_grad()
def predict(model, windows: Windows, batch_size: int = 256, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Forecasts and targets (W, H, n) for every window, in order."""
    model.eval()
    preds, targets = [], []
    for x, y, xt in _batches(windows, batch_size, None, device):
        preds.append(model(x, xt).float().cpu())
        targets.append(y.cpu())
    return torch.cat(preds), torch.cat(targets)


@torch.no_grad()
def two_sigma_coverage(model, windows: Windows, batch_size: int = 256, device="cpu") -> float:
    """Fraction of target values inside mean +- 2 standard deviations of a probabilistic model's
    forecast (0.954 for a calibrated Gaussian)."""
    model.eval()
    inside = total = 0
    for x, y, xt in _batches(windows, batch_size, None, device):
        mean, variance = model.predict_distribution(x, xt)
        inside += int(((y - mean).abs() <= 2 * variance.sqrt()).sum())
        total += y.numel()
    return inside / total


def _resolve(cfg: ForecastConfig) -> dict:
    if cfg.model not in MODELS:
        raise ValueError(f"model: expected one of {tuple(MODELS)}, got {cfg.model!r}")
    paper = {**TRAINING_DEFAULTS, **PAPER_TRAINING[cfg.model]}
    settings = {k: getattr(cfg, k, None) if getattr(cfg, k, None) is not None else v for k, v in paper.items()}
    for name in ("epochs", "patience", "batch_size"):
        if isinstance(settings[name], bool) or not isinstance(settings[name], int) or settings[name] <= 0:
            raise ValueError(f"{name}: expected a positive int, got {settings[name]!r}")
    for name in ("lr", "first_epoch_lr"):
        if not (isinstance(settings[name], (int, float)) and math.isfinite(settings[name]) and settings[name] > 0):
            raise ValueError(f"{name}: expected a positive number, got {settings[name]!r}")
    if not (isinstance(settings["beta1"], (int, float)) and 0 <= settings["beta1"] < 1):
        raise ValueError(f"beta1: expected a number in [0, 1), got {settings['beta1']!r}")
    return settings


def run_forecast(cfg: ForecastConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` and evaluate it on the test split.

    Returns the results record (also written to OUT/results.json): model, dataset, lookback,
    horizon, seed, mse, mae (standardised test split), val_mse of the best epoch, epochs run,
    the settings used, seconds, and the model's options.
    """
    settings = _resolve(cfg)
    # As in training.trainer: subnormal floats from a fresh model (Adam's squared gradients, decays
    # near zero in the scans) make x86 arithmetic ~10x slower; flushed to zero while on CPU.
    flush = torch.device(cfg.device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        return _run(cfg, settings)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def _run(cfg: ForecastConfig, settings: dict) -> dict:
    series = read_csv(cfg.data)
    splits = ett_splits(series, cfg.lookback, tuple(cfg.borders))
    n_vars = series.values.shape[1]
    overrides = dict(cfg.model_overrides)
    if cfg.model == "bi-mamba+" and "channel_mixing" not in overrides:
        overrides["channel_mixing"] = sra_decider(splits.train)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, n_vars, cfg.lookback, cfg.horizon, **overrides).to(cfg.device)
    train_w = Windows(splits.train, cfg.lookback, cfg.horizon, splits.train_time)
    val_w = Windows(splits.val, cfg.lookback, cfg.horizon, splits.val_time)
    test_w = Windows(splits.test, cfg.lookback, cfg.horizon, splits.test_time)

    from tqdm import tqdm

    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"] * settings["first_epoch_lr"],
                                 betas=(settings["beta1"], 0.999))
    generator = torch.Generator().manual_seed(cfg.seed)
    best_val, best_state, best_epoch, stale, epochs_run = math.inf, None, 0, 0, 0
    steps = math.ceil(len(train_w) / settings["batch_size"])
    if cfg.max_train_batches is not None:
        steps = min(steps, cfg.max_train_batches)
    start = time.time()
    for epoch in range(1, settings["epochs"] + 1):
        model.train()
        bar = tqdm(total=steps, desc=f"{cfg.model} epoch {epoch}", disable=not cfg.progress, leave=False)
        for step, (x, y, xt) in enumerate(_batches(train_w, settings["batch_size"], generator, cfg.device)):
            if step == steps:
                break
            if hasattr(model, "training_loss"):  # a model with its own objective (Mamba-ProbTSF)
                loss = model.training_loss(x, xt, y)
            else:
                loss = torch.nn.functional.mse_loss(model(x, xt), y)
            if hasattr(model, "regularizer"):
                loss = loss + model.regularizer(x, xt)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
        epochs_run = epoch
        val_mse, _ = mse_mae(*predict(model, val_w, device=cfg.device))
        if cfg.progress:
            print(f"epoch {epoch}: val mse {val_mse:.4f} (lr {optimizer.param_groups[0]['lr']:.2e})", flush=True)
        if val_mse < best_val:
            best_val, best_state, best_epoch, stale = val_mse, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= settings["patience"]:
                break
        for group in optimizer.param_groups:
            group["lr"] = settings["lr"] * LR_SCHEDULES[settings["schedule"]](epoch)
    model.load_state_dict(best_state)
    pred, target = predict(model, test_w, device=cfg.device)
    mse, mae = mse_mae(pred, target)
    extra = {}
    if hasattr(model, "predict_distribution"):
        extra["coverage_2sigma"] = two_sigma_coverage(model, test_w, device=cfg.device)
    record = dict(model=cfg.model, dataset=Path(cfg.data).stem, lookback=cfg.lookback, horizon=cfg.horizon,
                  seed=cfg.seed, mse=mse, mae=mae, val_mse=best_val, best_epoch=best_epoch, epochs_run=epochs_run,
                  **extra, **settings, seconds=round(time.time() - start, 1), device=cfg.device,
                  model_options=dict(overrides))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(text))
    plot_forecasts(out / "forecast.png", test_w, pred, series.columns, title=f"{cfg.model} on {record['dataset']}, "
                   f"H = {cfg.horizon}: test MSE {mse:.3f}, MAE {mae:.3f}")
    return record


def plot_forecasts(path: Path, windows: Windows, pred: torch.Tensor, columns: list[str], title: str = "",
                   n_windows: int = 3) -> Path:
    """PNG of the last variable (the target, e.g. OT) for ``n_windows`` evenly spaced test
    windows: look-back and truth against the forecast (standardised units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = torch.linspace(0, len(windows) - 1, n_windows).long().tolist()
    fig, axes = plt.subplots(n_windows, 1, figsize=(8, 2.4 * n_windows), dpi=100, squeeze=False)
    L, H = windows.lookback, windows.horizon
    for ax, i in zip(axes[:, 0], picks):
        x, y, _ = windows[i]
        ax.plot(range(L), x[:, -1], c="gray", lw=1, label="look-back")
        ax.plot(range(L, L + H), y[:, -1], c="black", lw=1, label="truth")
        ax.plot(range(L, L + H), pred[i, :, -1], c="tab:red", lw=1.2, label="forecast")
        ax.set_ylabel(f"{columns[-1]} (std.)")
        ax.set_title(f"test window {i}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)

