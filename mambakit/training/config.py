"""Training settings (:class:`TrainConfig`) and named model presets.

A preset is a small function ``layer -> model settings``; :func:`model_config` turns it into a
:class:`~mambakit.models.MambaConfig` for a given vocabulary. The paper-sized presets follow the
Mamba paper's table (d_model / n_layer: 130m 768/24, 370m 1024/48, 790m 1536/48, 1.4b 2048/48)
with each mixer's official defaults; ``tiny`` (tests) and ``small`` (the default: a few minutes on
a 2-core CPU) shrink the state and head sizes as well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from ..models.config import MambaConfig, jamba_config, moe_mamba_config

LAYERS = {"mamba1": "Mamba1", "mamba2": "Mamba2", "mamba3": "Mamba3"}
# Mixer settings that are not d_model, per mixer (Mamba-1 has no heads and no chunking).
_MIXER_KEYS = {"Mamba1": ("d_state",), "Mamba2": ("d_state", "headdim", "chunk_size"),
               "Mamba3": ("d_state", "headdim", "chunk_size")}


def _preset(d_model: int, n_layer: int, **mixer) -> Callable[[str], dict]:
    def settings(layer: str) -> dict:
        name = LAYERS[layer]
        ssm_cfg = {"layer": name, **{k: v for k, v in mixer.items() if k in _MIXER_KEYS[name]}}
        return {"d_model": d_model, "n_layer": n_layer, "ssm_cfg": ssm_cfg}

    return settings


def tiny(layer: str) -> dict:
    """Debug size for tests: d_model 32, 2 layers, state 8 (a few thousand parameters)."""
    return _preset(32, 2, d_state=8, headdim=8, chunk_size=16)(layer)


def small(layer: str) -> dict:
    """The CPU default: d_model 128, 4 layers, state 32, head size 32 (~0.5M parameters)."""
    return _preset(128, 4, d_state=32, headdim=32, chunk_size=64)(layer)


def mamba_130m(layer: str) -> dict:
    """d_model 768, 24 layers, official mixer defaults (Mamba paper, 130M class)."""
    return _preset(768, 24)(layer)


def mamba_370m(layer: str) -> dict:
    """d_model 1024, 48 layers (370M class)."""
    return _preset(1024, 48)(layer)


def mamba_790m(layer: str) -> dict:
    """d_model 1536, 48 layers (790M class)."""
    return _preset(1536, 48)(layer)


def mamba_1_4b(layer: str) -> dict:
    """d_model 2048, 48 layers (1.4B class)."""
    return _preset(2048, 48)(layer)


PRESETS: dict[str, Callable[[str], dict]] = {
    "tiny": tiny, "small": small, "130m": mamba_130m, "370m": mamba_370m, "790m": mamba_790m, "1.4b": mamba_1_4b,
}


ARCHS = ("mamba", "moe-mamba", "jamba")


def model_config(preset: str, layer: str, vocab_size: int, binary: bool = False, arch: str = "mamba",
                 mlp_size: int = 0, experts: int | None = None, n_layer: int | None = None) -> MambaConfig:
    """The :class:`MambaConfig` of ``preset`` with mixer ``layer`` ("mamba1" | "mamba2" | "mamba3")
    over ``vocab_size`` tokens (tied embeddings, vocabulary padded to a multiple of 8).

    ``binary``: 1-bit mixer projections. ``mlp_size``: a dense GatedMLP of this inner size after
    every mixer (0 = none). ``n_layer``: overrides the preset's depth. ``arch``: "mamba" (that
    stack), "moe-mamba" (every MLP a Switch layer of ``experts`` experts, default 8, each of
    ``mlp_size``) or "jamba" (:func:`~mambakit.models.config.jamba_config`: Mamba-1 with inner
    norms, attention at 4 of every 8 blocks, top-2 MoE of ``experts`` (default 16) every 2nd block).
    """
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    if layer not in LAYERS:
        raise ValueError(f"--layer: expected one of {sorted(LAYERS)}, got {layer!r}")
    if arch not in ARCHS:
        raise ValueError(f"--arch: expected one of {ARCHS}, got {arch!r}")
    if arch != "mamba" and mlp_size <= 0:
        raise ValueError(f"--mlp-size: --arch {arch} needs the experts' inner size, got {mlp_size}")
    settings = PRESETS[preset](layer)
    if n_layer is not None:
        settings["n_layer"] = n_layer
    config = MambaConfig(vocab_size=vocab_size, pad_vocab_size_multiple=8, tie_embeddings=True,
                         binary_projections=binary, d_intermediate=mlp_size, **settings)
    if arch == "moe-mamba":
        return moe_mamba_config(config, num_experts=experts or 8)
    if arch == "jamba":
        return jamba_config(config, num_experts=experts or 16)
    return config


@dataclass
class TrainConfig:
    """Everything that defines a training run; the CLI flags are these names with dashes.

    Batch sizes are global: ``batch_size`` sequences of ``seq_len`` tokens per optimizer step,
    split into ``grad_accum`` micro-batches and each micro-batch over the processes, so a run
    gives the same losses on any number of devices.

    Attributes:
        preset: model size, a key of :data:`PRESETS`.
        layer: mixer, "mamba1" | "mamba2" | "mamba3".
        data: None (the Python standard library's source, as bytes), a text file, a directory of
            text files, or a ``.bin`` of uint16 token ids.
        tokenizer: directory with a ``tokenizer.json`` to encode text data (None = bytes).
        seq_len: tokens per training sequence.
        batch_size: sequences per optimizer step, over all devices and accumulation steps.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (after linear warmup).
        min_lr: final learning rate of the cosine decay.
        warmup_steps: steps of linear warmup from ~0 to ``lr``.
        weight_decay: AdamW decay of matrices (not of embeddings, norms, biases, A_log, D, dt_bias).
        beta1, beta2: AdamW betas.
        grad_clip: clip the global gradient norm to this (0 = off).
        max_steps: optimizer steps; the schedule ends here.
        stop_at: stop (with a checkpoint) after this step although the schedule runs to
            ``max_steps``; for jobs with a time limit (None = run to the end).
        eval_every: evaluate and checkpoint every this many steps (and at the end).
        eval_windows: held-out sequences per evaluation.
        log_every: write a metrics record every this many steps.
        out: output directory (model, training state, metrics, plot).
        resume: continue from the checkpoint in ``out``.
        seed: seeds the model initialisation and the batch order.
        compile: ``torch.compile`` the model.
        binary: 1-bit in_proj / out_proj in every Mamba mixer (Bi-Mamba).
        arch: "mamba", "moe-mamba" or "jamba" (see :func:`model_config`).
        mlp_size: inner size of the MLP after every mixer, and of each expert (0 = no MLP).
        experts: experts per MoE layer (None = the architecture's default).
        n_layer: blocks, overriding the preset's (None = the preset's).
        device: torch device (None = cuda if available, else cpu).
        dist: "fsdp" or "ddp" when launched with torchrun on several processes.
        sample_tokens: tokens sampled from the model at the end (0 = none).
        sample_prompt: text the final sample continues.
    """

    preset: str = "small"
    layer: str = "mamba2"
    data: str | None = None
    tokenizer: str | None = None
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_steps: int = 600
    stop_at: int | None = None
    eval_every: int = 100
    eval_windows: int = 128
    log_every: int = 10
    out: str = "runs/train"
    resume: bool = False
    seed: int = 0
    compile: bool = False
    binary: bool = False
    arch: str = "mamba"
    mlp_size: int = 0
    experts: int | None = None
    n_layer: int | None = None
    device: str | None = None
    dist: str = "fsdp"
    sample_tokens: int = 300
    sample_prompt: str = "def "

    def __post_init__(self) -> None:
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        if self.preset not in PRESETS:
            raise ValueError(f"--preset: expected one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.layer not in LAYERS:
            raise ValueError(f"--layer: expected one of {sorted(LAYERS)}, got {self.layer!r}")
        if self.dist not in ("fsdp", "ddp"):
            raise ValueError(f"--dist: expected 'fsdp' or 'ddp', got {self.dist!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_windows", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{flag(name)}: expected a positive integer, got {value!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch: expected one of {ARCHS}, got {self.arch!r}")
        for name in ("experts", "n_layer"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{flag(name)}: expected a positive integer, got {value!r}")
        for name in ("warmup_steps", "sample_tokens", "mlp_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{flag(name)}: expected an integer >= 0, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size: {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}")
        if not self.lr > 0:
            raise ValueError(f"--lr: expected a number > 0, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr: expected a number in [0, --lr = {self.lr}], got {self.min_lr!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{flag(name)}: expected a number >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{flag(name)}: expected a number in [0, 1), got {getattr(self, name)!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.max_steps:
            raise ValueError(f"--stop-at: expected a step in [1, --max-steps = {self.max_steps}], got {self.stop_at!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Settings that change the sequence of losses; a resumed run must keep them.
TRAJECTORY_FIELDS = ("preset", "layer", "data", "tokenizer", "seq_len", "batch_size", "grad_accum", "lr", "min_lr",
                     "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "max_steps", "seed", "binary",
                     "arch", "mlp_size", "experts", "n_layer")
