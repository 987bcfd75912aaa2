"""The residual block: add -> norm -> mixer [-> add -> norm -> MLP], as the official ``Block``.

The block returns both the mixer/MLP output and the residual stream, so that the next block (or
the final norm) performs the addition: the same pre-norm network, written so the add and the norm
can be fused.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.norm import add_norm


class Block(nn.Module):
    """Args: dim; mixer (an nn.Module taking (hidden_states, inference_params=None)); mlp (an
    nn.Module or None); norm_cls (builds a norm over ``dim``); residual_in_fp32."""

    def __init__(self, dim: int, mixer: nn.Module, mlp: nn.Module | None, norm_cls, residual_in_fp32: bool = False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm_cls(dim)
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp
        else:
            self.mlp = None

    def _add_norm(self, hidden_states, residual, norm):
        kind = "layer" if isinstance(norm, nn.LayerNorm) else "rms"
        return add_norm(hidden_states, residual, norm.weight, bias=getattr(norm, "bias", None), eps=norm.eps,
                        kind=kind, residual_in_fp32=self.residual_in_fp32)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, inference_params=None, **mixer_kwargs):
        """hidden_states, residual (b, l, dim) -> (output, residual), both (b, l, dim)."""
        hidden_states, residual = self._add_norm(hidden_states, residual, self.norm)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(hidden_states, residual, self.norm2)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
