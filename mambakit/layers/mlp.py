"""Gated MLP (SwiGLU), parameter names as the official ``mamba_ssm`` ``GatedMLP``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .projection import project


class GatedMLP(nn.Module):
    """y = fc2(a * act(g)) with [a, g] = fc1(x).

    Args:
        in_features: input size.
        hidden_features: inner size before rounding; default int(8 * in_features / 3).
        out_features: output size; default in_features.
        activation: gate nonlinearity (default silu).
        bias: biases in fc1 and fc2.
        multiple_of: the inner size is rounded up to a multiple of this.
    """

    def __init__(self, in_features, hidden_features=None, out_features=None, activation=F.silu, bias=False,
                 multiple_of=128, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        out_features = out_features if out_features is not None else in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = -(-hidden // multiple_of) * multiple_of
        self.activation = activation
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = project(self.fc1, x).chunk(2, dim=-1)
        return project(self.fc2, value * self.activation(gate))
