"""Norm modules over :mod:`mambakit.ops.norm`.

Parameter names follow the official ``mamba_ssm`` modules (``weight``; the registered-but-absent
``bias``), so their state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import gated_rms_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last axis (official ``mamba_ssm.ops.triton.layer_norm.RMSNorm``).

    Args:
        hidden_size: d, the size of the last axis.
        eps: default 1e-5, added to the mean square.
        device, dtype: of the ``weight`` parameter (d,), initialised to ones.

    Example:
        >>> norm = RMSNorm(64)
        >>> norm(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d) in x's dtype; see :func:`mambakit.ops.norm.rms_norm`."""
        return rms_norm(x, self.weight, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class RMSNormGated(nn.Module):
    """Gated, grouped RMSNorm (official ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm``).

    Args:
        hidden_size: d, the size of the last axis.
        eps: default 1e-5, added to each group's mean square.
        group_size: positive int dividing d, default None (one group); Mamba-2 passes
            d_inner // ngroups.
        norm_before_gate: default True (the official class default); Mamba-2 passes False,
            i.e. ``rms_grouped(x * silu(z)) * weight``.
        device, dtype: of the ``weight`` parameter (d,), initialised to ones.

    Example:
        >>> norm = RMSNormGated(12, group_size=4, norm_before_gate=False)
        >>> norm(torch.randn(2, 10, 12), z=torch.randn(2, 10, 12)).shape
        torch.Size([2, 10, 12])
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        if group_size is not None and (
            isinstance(group_size, bool) or not isinstance(group_size, int)
            or group_size <= 0 or hidden_size % group_size
        ):
            raise ValueError(
                f"group_size: expected a positive divisor of hidden_size = {hidden_size}, got {group_size!r}"
            )
        self.hidden_size = hidden_size
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """x, z (..., d) -> (..., d) in x's dtype; see :func:`mambakit.ops.norm.gated_rms_norm`."""
        return gated_rms_norm(x, self.weight, z, eps=self.eps, group_size=self.group_size,
                              norm_before_gate=self.norm_before_gate)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
