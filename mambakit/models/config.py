"""Model configuration, field for field the official ``mamba_ssm`` ``MambaConfig``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SSM_LAYERS = ("Mamba1", "Mamba2", "Mamba3")


@dataclass
class MambaConfig:
    """A language model: embedding -> n_layer blocks (norm -> mixer -> residual [-> norm -> MLP])
    -> final norm -> LM head.

    Attributes (official names and defaults):
        d_model: hidden size.
        d_intermediate: GatedMLP hidden size after each mixer; 0 = no MLP.
        n_layer: number of blocks.
        vocab_size: tokens; padded up to a multiple of ``pad_vocab_size_multiple``.
        ssm_cfg: keyword arguments of the mixer, with ``"layer"`` in ``"Mamba1" | "Mamba2" |
            "Mamba3"`` (default ``"Mamba1"``).
        attn_layer_idx: blocks whose mixer is causal multi-head attention instead (hybrids).
        attn_cfg: keyword arguments of :class:`mambakit.layers.MHA` for those blocks.
        rms_norm: RMSNorm (True) or LayerNorm (False) for the block and final norms.
        residual_in_fp32: keep the residual stream in float32.
        fused_add_norm: accepted for compatibility; the add + norm gives the same result either way.
        pad_vocab_size_multiple: pad the vocabulary (and embedding) to a multiple of this.
        tie_embeddings: the LM head shares the embedding matrix.
        norm_epsilon: epsilon of the block and final norms (the official ``MixerModel`` argument;
            1e-5 there too).
        binary_projections: the Mamba mixers' in_proj and out_proj are 1-bit
            :class:`~mambakit.layers.BinaryLinear` layers (Bi-Mamba); everything else stays full
            precision. Not an official field: only ``format="mamba_ssm"`` checkpoints hold it.
        moe_layer_idx: blocks whose MLP is a routed mixture of experts (:class:`~mambakit.layers.MoE`)
            instead of the dense GatedMLP (hybrids such as MoE-Mamba and Jamba). Not official.
        moe_cfg: keyword arguments of :class:`~mambakit.layers.MoE` for those blocks; each expert's
            inner size defaults to ``d_intermediate``. Not official.

    :func:`moe_mamba_config` and :func:`jamba_config` build the two published layouts.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    binary_projections: bool = False
    moe_layer_idx: list = field(default_factory=list)
    moe_cfg: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.binary_projections, bool):
            raise TypeError(f"binary_projections: expected a bool, got {self.binary_projections!r}")
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(self.d_intermediate, bool) or not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"d_intermediate: expected an int >= 0, got {self.d_intermediate!r}")
        if not isinstance(self.ssm_cfg, dict):
            raise TypeError(f"ssm_cfg: expected a dict, got {type(self.ssm_cfg).__name__}")
        layer = self.ssm_cfg.get("layer", "Mamba1")
        if layer not in SSM_LAYERS:
            raise ValueError(f"ssm_cfg['layer']: expected one of {SSM_LAYERS}, got {layer!r}")
        for kind in ("attn", "moe"):  # which blocks get attention / experts, and their arguments
            cfg, indices = getattr(self, f"{kind}_cfg"), getattr(self, f"{kind}_layer_idx")
            if not isinstance(cfg, dict):
                raise TypeError(f"{kind}_cfg: expected a dict, got {type(cfg).__name__}")
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layer]
            if bad:
                raise ValueError(f"{kind}_layer_idx: expected layer indices in [0, {self.n_layer}), got {bad}")
        if self.moe_layer_idx and not self.d_intermediate and "hidden_features" not in self.moe_cfg:
            raise ValueError("moe_layer_idx: the experts need an inner size: set d_intermediate or "
                             "moe_cfg['hidden_features']")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    @classmethod
    def from_dict(cls, data: dict) -> "MambaConfig":
        """Build from a dict (e.g. a config.json); unknown keys are an error, missing keys take
        their defaults."""
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def moe_mamba_config(base: MambaConfig, num_experts: int = 8, capacity_factor: float = 1.25,
                     aux_loss_coef: float = 0.01) -> MambaConfig:
    """MoE-Mamba (Pioro et al. 2024): every Mamba block followed by a Switch (top-1) layer of
    ``num_experts`` experts, each the size of ``base``'s dense MLP (``base.d_intermediate`` > 0), so
    the active parameters per token equal ``base``'s."""
    if not isinstance(base, MambaConfig):
        raise TypeError(f"base: expected a MambaConfig, got {type(base).__name__}")
    if base.d_intermediate <= 0:
        raise ValueError("base: expected d_intermediate > 0 (the size of each expert)")
    return dataclasses.replace(
        base, moe_layer_idx=list(range(base.n_layer)),
        moe_cfg={"num_experts": num_experts, "top_k": 1, "capacity_factor": capacity_factor,
                 "aux_loss_coef": aux_loss_coef})


def jamba_config(base: MambaConfig, num_experts: int = 16, top_k: int = 2, attn_period: int = 8,
                 attn_offset: int = 4, moe_period: int = 2, moe_offset: int = 1, num_heads: int | None = None,
                 capacity_factor: float = 1.25, aux_loss_coef: float = 0.01) -> MambaConfig:
    """Jamba (Lieber et al. 2024) over ``base`` (d_model, n_layer, d_intermediate): one attention
    block per ``attn_period`` (at ``attn_offset`` in each), the others Mamba-1 with RMSNorm on
    Delta, B and C; the MLP of every ``moe_period``-th block (from ``moe_offset``) a top-``top_k`` MoE
    over ``num_experts`` experts, the rest dense. ``base.n_layer`` must hold one whole period."""
    if not isinstance(base, MambaConfig):
        raise TypeError(f"base: expected a MambaConfig, got {type(base).__name__}")
    if base.d_intermediate <= 0:
        raise ValueError("base: expected d_intermediate > 0 (the MLP and expert size)")
    if base.n_layer < attn_period or base.n_layer % attn_period:
        raise ValueError(f"base: expected n_layer a multiple of attn_period = {attn_period}, got {base.n_layer}")
    heads = num_heads or max(1, base.d_model // 64)
    ssm_cfg = {k: v for k, v in base.ssm_cfg.items() if k in ("d_state", "d_conv", "expand", "dt_rank")}
    return dataclasses.replace(
        base, ssm_cfg={**ssm_cfg, "layer": "Mamba1", "inner_norms": True},
        attn_layer_idx=[i for i in range(base.n_layer) if i % attn_period == attn_offset],
        attn_cfg={"num_heads": heads, "causal": True},  # no positional encoding, as in Jamba
        moe_layer_idx=[i for i in range(base.n_layer) if i % moe_period == moe_offset],
        moe_cfg={"num_experts": num_experts, "top_k": top_k, "capacity_factor": capacity_factor,
                 "aux_loss_coef": aux_loss_coef})
