"""Load and save checkpoints: Hugging Face ``transformers`` (``MambaForCausalLM``,
``Mamba2ForCausalLM``) and the official ``mamba_ssm`` layout.

Loading never executes code from a checkpoint: ``.bin`` files are read with
``torch.load(weights_only=True)``, safetensors is preferred when both exist, and there is no
remote-code mechanism. Files are written to a temporary name and renamed, the weights before
``config.json``, so a directory with a config is never a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .models.config import MambaConfig
from .models.lm import MambaLM

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

# transformers names the embedding "embeddings"; everything else matches the official names.
_HF_EMBEDDING = "backbone.embeddings.weight"
_OURS_EMBEDDING = "backbone.embedding.weight"


# The official ``mamba_ssm`` MambaConfig's fields (2.x): its loader rejects any other key.
OFFICIAL_CONFIG_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                          "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                          "tie_embeddings")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as a mambakit model."""


# --------------------------------------------------------------------------------------------
# config translation
# --------------------------------------------------------------------------------------------


def _json_number(value) -> float:
    """A number from config.json; transformers writes infinities as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise CheckpointError(f"config.json: expected a number, got {value!r}")


def _config_from_hf(hf: dict) -> tuple[MambaConfig, dict]:
    """transformers config.json -> (MambaConfig, per-layer attribute overrides)."""
    kind = hf.get("model_type")
    if kind not in ("mamba", "mamba2"):
        raise CheckpointError(f"config.json: model_type {kind!r} is not supported (expected 'mamba' or 'mamba2')")
    required = ["hidden_size", "num_hidden_layers", "vocab_size"] + (["num_heads"] if kind == "mamba2" else [])
    missing = [key for key in required if key not in hf]
    if missing:
        raise CheckpointError(f"config.json: missing {missing} for model_type {kind!r}")
    common = dict(
        d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], vocab_size=hf["vocab_size"], d_intermediate=0,
        rms_norm=True, residual_in_fp32=hf.get("residual_in_fp32", True), fused_add_norm=False,
        pad_vocab_size_multiple=1, tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    if kind == "mamba":
        rank = hf.get("time_step_rank", "auto")
        ssm_cfg = dict(
            layer="Mamba1", d_state=hf.get("state_size", 16), d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
            dt_rank=rank, bias=hf.get("use_bias", False), conv_bias=hf.get("use_conv_bias", True),
            dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
            dt_init=hf.get("time_step_init_scheme", "random"), dt_scale=hf.get("time_step_scale", 1.0),
            dt_init_floor=hf.get("time_step_floor", 1e-4),
        )
        return MambaConfig(**common, ssm_cfg=ssm_cfg), {}
    else:
        d_inner = int(hf.get("expand", 2) * hf["hidden_size"])
        heads, head_dim = hf["num_heads"], hf.get("head_dim", 64)
        if heads * head_dim != d_inner:
            raise CheckpointError(
                f"config.json: num_heads * head_dim = {heads} * {head_dim} must equal expand * hidden_size = {d_inner}")
        limit = hf.get("time_step_limit", (0.0, float("inf")))
        ssm_cfg = dict(
            layer="Mamba2", d_state=hf.get("state_size", 128), d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
            headdim=head_dim, ngroups=hf.get("n_groups", 1), bias=hf.get("use_bias", False),
            conv_bias=hf.get("use_conv_bias", True), chunk_size=hf.get("chunk_size", 256),
            dt_min=hf.get("time_step_min", 0.001), dt_max=hf.get("time_step_max", 0.1),
            dt_init_floor=hf.get("time_step_floor", 1e-4), dt_limit=tuple(_json_number(v) for v in limit),
        )
        # The gated norm inside each mixer uses the checkpoint's epsilon (official: 1e-5 fixed).
        return MambaConfig(**common, ssm_cfg=ssm_cfg), {"mixer.norm.eps": hf.get("layer_norm_epsilon", 1e-5)}


def _config_to_hf(config: MambaConfig, model: MambaLM) -> dict:
    if config.binary_projections:
        raise ValueError("format: 'hf' has no 1-bit projections (binary_projections=True); use format='mamba_ssm'")
    layer = config.ssm_cfg.get("layer", "Mamba1")
    if (config.attn_layer_idx or config.moe_layer_idx or config.d_intermediate or not config.rms_norm
            or layer == "Mamba3" or config.ssm_cfg.get("inner_norms")):
        raise ValueError("format: 'hf' holds pure Mamba-1 or Mamba-2 models with RMSNorm and no attention, MLP or experts; "
                         "use format='mamba_ssm' for this model")
    if config.padded_vocab_size != config.vocab_size:
        raise ValueError(f"format: 'hf' needs an unpadded vocabulary; vocab_size {config.vocab_size} pads to "
                         f"{config.padded_vocab_size} (set pad_vocab_size_multiple=1 or use format='mamba_ssm')")
    mixer = model.backbone.layers[0].mixer
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, num_hidden_layers=config.n_layer,
        layer_norm_epsilon=config.norm_epsilon, residual_in_fp32=config.residual_in_fp32,
        tie_word_embeddings=config.tie_embeddings, use_conv_bias=mixer.conv1d.bias is not None,
        use_bias=mixer.in_proj.bias is not None, conv_kernel=mixer.d_conv, expand=mixer.expand,
        state_size=mixer.d_state, intermediate_size=mixer.d_inner, hidden_act="silu",
    )
    cfg = config.ssm_cfg
    if layer == "Mamba1":
        return dict(common, model_type="mamba", architectures=["MambaForCausalLM"], time_step_rank=mixer.dt_rank,
                    time_step_min=cfg.get("dt_min", 0.001), time_step_max=cfg.get("dt_max", 0.1),
                    time_step_scale=cfg.get("dt_scale", 1.0), time_step_init_scheme=cfg.get("dt_init", "random"),
                    time_step_floor=cfg.get("dt_init_floor", 1e-4))
    if getattr(mixer, "d_ssm", mixer.d_inner) != mixer.d_inner or getattr(mixer, "D_has_hdim", False) or not getattr(mixer, "rmsnorm", True):
        raise ValueError("format: 'hf' Mamba-2 needs d_ssm = d_inner, D per head and the gated RMSNorm; use format='mamba_ssm'")
    limit = tuple(cfg.get("dt_limit", (0.0, float("inf"))))
    return dict(common, model_type="mamba2", architectures=["Mamba2ForCausalLM"], num_heads=mixer.nheads,
                head_dim=mixer.headdim, n_groups=mixer.ngroups, chunk_size=cfg.get("chunk_size", 256),
                time_step_limit=list(limit), time_step_min=cfg.get("dt_min", 0.001), time_step_max=cfg.get("dt_max", 0.1),
                time_step_floor=cfg.get("dt_init_floor", 1e-4), rms_norm=True, norm_before_gate=False)


# --------------------------------------------------------------------------------------------
# reading tensors
# --------------------------------------------------------------------------------------------


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: refused or unreadable; weights are loaded with weights_only=True, which "
                              f"allows only tensors and plain containers ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
    return state


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors first, then .bin, sharded or not."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        if (directory / single).exists():
            return _read_weight_file(directory / single)
        if (directory / index).exists():
            weight_map = json.loads((directory / index).read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{directory / index}: expected a 'weight_map' of tensor name -> shard file")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = (directory / shard).resolve()
                if shard_path.parent != directory.resolve():
                    raise CheckpointError(f"{directory / index}: shard {shard!r} lies outside the checkpoint directory")
                if not shard_path.exists():
                    raise CheckpointError(f"{directory / index}: shard file {shard} is missing")
                state.update(_read_weight_file(shard_path))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{directory / index}: tensors {missing[:5]} listed in the index are in no shard")
            return state
    raise CheckpointError(f"{directory}: no weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})")


def _load_into(model: MambaLM, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    if model.config.tie_embeddings:
        state.setdefault("lm_head.weight", state.get(_OURS_EMBEDDING))
    missing = sorted(k for k in expected if k not in state or state[k] is None)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        raise CheckpointError(f"state dict does not match the model: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(state[name].shape)} does not match the model's {tuple(tensor.shape)}")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(state[name])


def load_pretrained(path, device=None, dtype: torch.dtype | None = None) -> MambaLM:
    """Load a model from a local directory in transformers or official ``mamba_ssm`` format.

    Args:
        path: directory with config.json and weights (model.safetensors, pytorch_model.bin, or
            their sharded forms with an index).
        device: where to put the model (default CPU).
        dtype: parameter dtype (default: float32).

    Returns: a :class:`MambaLM` in eval mode. Its ``tokenizer`` attribute is the directory's
    tokenizer (``tokenizers`` package) if it has one, else a byte-level tokenizer.
    """
    from .tokenizer import load_tokenizer

    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"path: {directory} is not a directory")
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"path: {config_path} is missing")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path}: not valid JSON ({err})") from err
    overrides: dict = {}
    if "model_type" in raw:
        config, overrides = _config_from_hf(raw)
        source = "hf"
    else:
        config = MambaConfig.from_dict(raw)
        source = "mamba_ssm"
    state = read_state_dict(directory)
    if source == "hf":
        state = {(_OURS_EMBEDDING if k == _HF_EMBEDDING else k): v for k, v in state.items()}
    model = MambaLM(config)
    for name, value in overrides.items():
        for layer in model.backbone.layers:
            owner = layer
            *parts, attr = name.split(".")
            for part in parts:
                owner = getattr(owner, part)
            setattr(owner, attr, value)
    _load_into(model, state)
    model.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
    model.eval()
    model.tokenizer = load_tokenizer(directory)
    if isinstance(raw.get("eos_token_id"), int) and model.tokenizer.vocab_size > 256:
        model.tokenizer.eos_token_id = raw["eos_token_id"]  # the checkpoint's own vocabulary
    return model


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def atomic_write(path: Path, write) -> None:
    """Run ``write(temp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _config_to_official(config: MambaConfig) -> dict:
    """The official MambaConfig's fields, and mambakit's own (norm_epsilon, binary projections,
    MoE) only where they differ from their defaults: a plain model's config.json then loads in
    ``mamba_ssm``, and one that uses an extension, which the official package could not build
    anyway, keeps it for :func:`load_pretrained`."""
    defaults = MambaConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if k in OFFICIAL_CONFIG_FIELDS or v != defaults[k]}


def save_pretrained(model: MambaLM, path, format: str = "hf") -> None:
    """Write ``model`` to the directory ``path`` (created if needed).

    ``format="hf"``: config.json as transformers' ``MambaConfig``/``Mamba2Config`` and
    model.safetensors (tied head omitted, as transformers does); loads in transformers.
    ``format="mamba_ssm"``: config.json as the official ``MambaConfig`` (plus mambakit's own
    fields where the model uses them) and pytorch_model.bin.
    """
    if format not in ("hf", "mamba_ssm"):
        raise ValueError(f"format: expected 'hf' or 'mamba_ssm', got {format!r}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "hf":
        config = _config_to_hf(model.config, model)
        state[_HF_EMBEDDING] = state.pop(_OURS_EMBEDDING)
        if model.config.tie_embeddings:
            state.pop("lm_head.weight")
        from safetensors.torch import save_file

        atomic_write(directory / SAFETENSORS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        stale = directory / BIN
    else:
        config = _config_to_official(model.config)
        atomic_write(directory / BIN, lambda tmp: torch.save(state, tmp))
        stale = directory / SAFETENSORS
    if stale.exists():  # a leftover of the other format would shadow or confuse the new weights
        stale.unlink()
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(text))
