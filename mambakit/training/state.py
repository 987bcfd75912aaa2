"""Training checkpoints: the model in the format :func:`mambakit.load_pretrained` reads, plus what
an exact resume needs.

Layout of an output directory::

    OUT/config.json, OUT/pytorch_model.bin       latest model (``mambakit generate --model OUT``)
    OUT/training_state/step-00000500/
        config.json, pytorch_model.bin           the model at that step
        optimizer.pt                             AdamW state (tensors and plain containers only)
        rng.pt                                   torch RNG states as uint8 tensors
        state.json                               step, scheduler, training settings
        COMPLETE                                 written last: file names and sizes

A checkpoint is written into a hidden temporary folder, completed with its marker, then renamed
into place; only then are the model files at the top hard-linked (or copied) over the previous
ones, each by an atomic rename, and older steps removed. Reading never unpickles arbitrary
objects: tensors through ``torch.load(weights_only=True)``, the rest JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..checkpoints import BIN, CheckpointError, atomic_write, read_state_dict
from ..models import MambaConfig, MambaLM

STATE_DIR = "training_state"
MARKER = "COMPLETE"
_FILES = ("config.json", BIN, "optimizer.pt", "rng.pt", "state.json")


def step_dirs(out: Path) -> list[Path]:
    """Completed-or-not checkpoint folders ``step-N`` under OUT/training_state, oldest first."""
    root = Path(out) / STATE_DIR
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def save_checkpoint(out: Path, step: int, config: MambaConfig, model_state: dict, optim_state: dict,
                    scheduler_state: dict, train_settings: dict) -> Path:
    """Write the checkpoint of ``step`` (see the module docstring); returns its folder.

    ``model_state``/``optim_state``: full CPU state dicts (as :func:`distributed.full_state` gives
    them). Call on one process only.
    """
    out = Path(out)
    root = out / STATE_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Build a CPU model around the gathered tensors (no copy) so the model files are exactly
    # what save_pretrained writes.
    with torch.device("meta"):
        export = MambaLM(config)
    export.load_state_dict(model_state, assign=True)
    export.tie_weights()
    export.save_pretrained(tmp, format="mamba_ssm")
    torch.save(optim_state, tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    state = {"step": step, "scheduler": scheduler_state, "train_config": train_settings}
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for name in _FILES:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    sizes = {name: (tmp / name).stat().st_size for name in _FILES}
    (tmp / MARKER).write_text(json.dumps({"files": sizes}, indent=2) + "\n")
    os.replace(tmp, final)
    for name in (BIN, "config.json"):  # weights before config, as save_pretrained does
        atomic_write(out / name, lambda t, src=final / name: _link_or_copy(src, Path(t)))
    for old in step_dirs(out):
        if old != final:
            shutil.rmtree(old)
    return final


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink()
    try:
        os.link(src, dst)
    except OSError:  # file systems without hard links
        shutil.copyfile(src, dst)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest ``step-N`` folder of ``out`` (None if there is none); it is not validated here."""
    dirs = step_dirs(out)
    return dirs[-1] if dirs else None


def read_checkpoint(path: Path) -> tuple[dict, dict, dict, dict]:
    """Validate and read a checkpoint folder -> (state.json dict, model state, optimizer state, rng).

    Raises :class:`~mambakit.checkpoints.CheckpointError` naming what is wrong (no marker: an
    interrupted save; a size differing from the marker: a truncated or replaced file; unreadable
    tensors or JSON).
    """
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker; the save was interrupted). "
                              f"Delete this folder to resume from an earlier one, or start a new run in another --out")
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{marker}: unreadable marker ({err})") from err
    for name in _FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if file.stat().st_size != sizes.get(name):
            raise CheckpointError(f"{file}: size {file.stat().st_size} bytes differs from the {sizes.get(name)} recorded "
                                  f"when it was written (truncated or replaced)")
    try:
        state = json.loads((path / "state.json").read_text())
        step = state["step"]
        state["scheduler"], state["train_config"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable training state ({err})") from err
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path / 'state.json'}: step {step!r} is not an integer >= 0")
    model_state = read_state_dict(path)
    tensors = {}
    for name in ("optimizer.pt", "rng.pt"):
        try:
            tensors[name] = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{path / name}: unreadable (loaded with weights_only=True; "
                                  f"{type(err).__name__}: {err})") from err
    return state, model_state, tensors["optimizer.pt"], tensors["rng.pt"]


def restore_rng(rng: dict) -> None:
    """Set torch's RNG states from :func:`read_checkpoint`'s ``rng`` (CUDA ones where present)."""
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
