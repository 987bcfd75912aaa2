"""Bidirectional Mamba mixer (Vision Mamba style) for any of the three layer types.

One input projection is shared; the backward branch has its own copy of everything between the
projections (for Mamba-1: conv1d, x_proj, dt_proj, A_log, D) and reads the projected sequence
reversed. The two branches' gated outputs are averaged and go through one shared output
projection:

    y = out_proj((mix_f(P) + flip(mix_b(flip(P)))) / 2),   P = in_proj(x).

For Mamba-1 the gate is linear in the scan output, so this is y = out_proj((y_f + flip(y_b)) / 2
* silu(z)) exactly. Mamba-2 and Mamba-3 apply their gated output norm inside each branch (with
the shared z), before the average.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .mixer_common import check_hidden_states


class BidirectionalMixer(nn.Module):
    """(b, l, d_model) -> (b, l, d_model), every output token seeing the whole sequence.

    Args:
        layer_cls: ``Mamba1``, ``Mamba2`` or ``Mamba3`` (any mixer with ``in_proj``, ``out_proj``
            and ``mix_projected(projected)``).
        d_model: model width.
        **layer_kwargs: passed to both branches' constructors.

    Parameters: ``forward_branch`` (a whole mixer, whose in_proj and out_proj are the shared
    ones) and ``backward_branch`` (the same mixer without in_proj and out_proj).

    Example:
        >>> from mambakit.layers import Mamba1
        >>> mixer = BidirectionalMixer(Mamba1, 16)
        >>> mixer(torch.randn(2, 7, 16)).shape
        torch.Size([2, 7, 16])
    """

    def __init__(self, layer_cls: type[nn.Module], d_model: int, **layer_kwargs):
        super().__init__()
        if not hasattr(layer_cls, "mix_projected"):
            raise TypeError(f"layer_cls: expected a mixer class with mix_projected (Mamba1/2/3), got {layer_cls!r}")
        self.d_model = d_model
        self.forward_branch = layer_cls(d_model, **layer_kwargs)
        self.backward_branch = layer_cls(d_model, **layer_kwargs)
        # The backward branch shares the forward branch's projections.
        self.backward_branch.in_proj = None
        self.backward_branch.out_proj = None

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model). No inference cache: the mixer is not
        causal, so there is no token-by-token decoding."""
        if inference_params is not None:
            raise ValueError("inference_params: a bidirectional mixer has no recurrent decoding; pass None")
        check_hidden_states(hidden_states, self.d_model)
        projected = self.forward_branch.in_proj(hidden_states)
        y_forward = self.forward_branch.mix_projected(projected)
        y_backward = self.backward_branch.mix_projected(projected.flip(1)).flip(1)
        return self.forward_branch.out_proj((y_forward + y_backward) / 2)
