"""The language model: parameter names as the official ``MambaLMHeadModel`` (``backbone.embedding``,
``backbone.layers.{i}.{norm,mixer,norm2,mlp}``, ``backbone.norm_f``, ``lm_head``)."""

from __future__ import annotations

import copy
import math
from functools import partial

import torch
import torch.nn as nn

from ..cache import InferenceCache
from ..layers import MHA, Block, GatedMLP, Mamba1, Mamba2, Mamba3, MoE, RMSNorm, binarize_projections
from ..layers.projection import project
from ..ops.norm import add_norm
from .config import MambaConfig

MIXERS = {"Mamba1": Mamba1, "Mamba2": Mamba2, "Mamba3": Mamba3}


def _init_weights(module: nn.Module, n_layer: int, initializer_range: float = 0.02,
                  rescale_prenorm_residual: bool = True, n_residuals_per_layer: int = 1) -> None:
    """The official initialisation: zero Linear biases (except those marked ``_no_reinit``),
    N(0, initializer_range) embeddings, and output projections scaled by 1/sqrt(n_residuals * n_layer)
    (GPT-2's scheme for weights that write to the residual stream)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual and isinstance(module, MoE):  # each expert's fc2 as a dense fc2 below
        with torch.no_grad():
            module.fc2.uniform_(-1, 1).mul_(1 / math.sqrt(module.hidden * n_residuals_per_layer * n_layer))
    if rescale_prenorm_residual:
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    """embedding -> blocks -> final norm; returns hidden states (b, l, d_model)."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, **factory)
        norm_cls = partial(RMSNorm if config.rms_norm else nn.LayerNorm, eps=config.norm_epsilon, **factory)
        self.layers = nn.ModuleList([self._block(config, i, norm_cls, factory) for i in range(config.n_layer)])
        self.norm_f = norm_cls(config.d_model)

    @staticmethod
    def _block(config: MambaConfig, layer_idx: int, norm_cls, factory) -> Block:
        if layer_idx in config.attn_layer_idx:
            mixer = MHA(config.d_model, layer_idx=layer_idx, **config.attn_cfg, **factory)
        else:
            ssm_cfg = copy.deepcopy(config.ssm_cfg)
            layer = ssm_cfg.pop("layer", "Mamba1")
            mixer = MIXERS[layer](config.d_model, layer_idx=layer_idx, **ssm_cfg, **factory)
        mlp = None
        if layer_idx in config.moe_layer_idx:
            moe_cfg = {"hidden_features": config.d_intermediate, **config.moe_cfg}
            mlp = MoE(config.d_model, **moe_cfg, **factory)
        elif config.d_intermediate > 0:
            mlp = GatedMLP(config.d_model, hidden_features=config.d_intermediate, out_features=config.d_model, **factory)
        return Block(config.d_model, mixer, mlp, norm_cls=norm_cls, residual_in_fp32=config.residual_in_fp32)

    def forward(self, input_ids: torch.Tensor, inference_params: InferenceCache | None = None) -> torch.Tensor:
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
        kind = "layer" if isinstance(self.norm_f, nn.LayerNorm) else "rms"
        hidden_states, _ = add_norm(hidden_states, residual, self.norm_f.weight, bias=getattr(self.norm_f, "bias", None),
                                    eps=self.norm_f.eps, kind=kind, residual_in_fp32=self.config.residual_in_fp32)
        return hidden_states


class MambaLM(nn.Module):
    """Causal language model over any mix of Mamba-1/2/3 and attention blocks.

    ``MambaLM(config)(input_ids (b, l) int64)`` returns logits (b, l, padded_vocab_size).
    Decoding: ``allocate_inference_cache`` then forward with ``inference_params``; or
    :meth:`generate`.
    """

    def __init__(self, config: MambaConfig, initializer_cfg: dict | None = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config: expected a MambaConfig, got {type(config).__name__}")
        self.config = config
        self.backbone = MixerModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        # The official model applies its initialisation twice (backbone, then whole model with one
        # residual per layer); the second pass decides the result, so one pass of it is the same.
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        if config.binary_projections:  # after the init: alpha and beta come from the initial weights
            binarize_projections(self)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def aux_loss(self) -> torch.Tensor | None:
        """The mixture-of-experts load-balancing losses of the last forward, summed over layers and
        already weighted by each layer's ``aux_loss_coef``; None for a model without experts."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    def active_parameters(self) -> int:
        """Parameters that process each token: all of them, less the experts a token is not routed
        to (``num_experts - top_k`` of each MoE block's experts)."""
        idle = sum((m.num_experts - m.top_k) * (m.fc1[0].numel() + m.fc2[0].numel())
                   for m in self.modules() if isinstance(m, MoE))
        return sum(p.numel() for p in self.parameters()) - idle

    def expert_stats(self) -> dict:
        """Routing of the last forward, per MoE block: ``{"load": {layer: [fraction of assignments
        per expert]}, "dropped": {layer: fraction dropped by capacity}}``; empty without experts."""
        stats = {"load": {}, "dropped": {}}
        for i, layer in enumerate(self.backbone.layers):
            if isinstance(layer.mlp, MoE) and layer.mlp.last_load is not None:
                stats["load"][i] = layer.mlp.last_load.tolist()
                stats["dropped"][i] = float(layer.mlp.last_dropped)
        return stats if stats["load"] else {}

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None) -> InferenceCache:
        """A cache whose per-layer states are allocated now (fixed shapes, reused in place)."""
        cache = InferenceCache(max_batch_size=batch_size, max_seqlen=max_seqlen)
        for i, layer in enumerate(self.backbone.layers):
            cache.states[i] = layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
        return cache

    def forward(self, input_ids: torch.Tensor, inference_params: InferenceCache | None = None,
                num_last_tokens: int = 0) -> torch.Tensor:
        """input_ids (b, l) integer token ids -> logits (b, l, padded_vocab_size) (only the last
        ``num_last_tokens`` positions if > 0)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids: expected an int64/int32 tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected shape (b, l) with l >= 1, got {tuple(input_ids.shape)}")
        hidden_states = self.backbone(input_ids, inference_params=inference_params)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        return project(self.lm_head, hidden_states)

    def generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
        """Sample a continuation; see :func:`mambakit.generation.generate` for the options."""
        from ..generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def save_pretrained(self, path, format: str = "hf") -> None:
        """Write config.json + weights to the directory ``path`` (``"hf"``: transformers layout,
        safetensors; ``"mamba_ssm"``: the official package's layout, pytorch_model.bin)."""
        from ..checkpoints import save_pretrained

        save_pretrained(self, path, format=format)
