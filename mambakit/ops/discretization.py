"""Discretization of the continuous system h'(t) = A h(t) + B x(t) with step Delta (MATH.md section 1).

The functions are elementwise in a diagonal A (the case every Mamba uses) except
:func:`zoh_matrix`, which takes a full matrix. They broadcast like ordinary torch arithmetic and
are differentiable.
"""

from __future__ import annotations

import torch

from ._checks import expect_tensor

_REAL_OR_COMPLEX = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)

# Below this |z| the Taylor series 1 + z/2 + z^2/6 + z^3/24 is used: its truncation error
# (|z|^4 / 120 < 1e-18) is under float64 rounding, and it avoids 0/0 and a NaN gradient at 0.
_SERIES_BELOW = 1e-4


def expm1_over_x(z: torch.Tensor) -> torch.Tensor:
    """(e^z - 1) / z, stable near z = 0 (value 1 at 0) and with a finite gradient there.

    Args: z: any shape, real or complex. Returns: same shape and dtype.
    """
    expect_tensor("z", z, dtypes=_REAL_OR_COMPLEX)
    small = z.abs() < _SERIES_BELOW
    safe_z = torch.where(small, torch.ones_like(z), z)
    series = 1 + z * (0.5 + z * (1.0 / 6 + z / 24))
    return torch.where(small, series, torch.expm1(safe_z) / safe_z)


def euler(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential decay with an Euler input step (what Mamba-1/2 use): (exp(Delta A), Delta B).

    Args: delta (...) broadcastable with A and B (diagonal A). Returns (A_bar, B_bar).
    """
    return torch.exp(delta * A), delta * B


def zoh(delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for a diagonal A: A_bar = exp(Delta A), B_bar = (exp(Delta A) - 1)/(Delta A) Delta B.

    Exact for an input held constant over each step. Args broadcast elementwise; A may be 0.
    """
    z = delta * A
    return torch.exp(z), expm1_over_x(z) * delta * B


def zoh_matrix(delta: torch.Tensor | float, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold for a full matrix A (n, n) and B (n, m), A need not be invertible.

    Uses exp([[Delta A, Delta B], [0, 0]]) = [[A_bar, B_bar], [0, I]], which equals
    (Delta A)^-1 (exp(Delta A) - I) Delta B whenever the inverse exists.

    Args: delta: scalar or tensor of shape (...); A: (..., n, n); B: (..., n, m).
    Returns: A_bar (..., n, n), B_bar (..., n, m).
    """
    expect_tensor("A", A)
    expect_tensor("B", B)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A: expected a square matrix (..., n, n), got shape {tuple(A.shape)}")
    n = A.shape[-1]
    if B.dim() < 2 or B.shape[-2] != n:
        raise ValueError(f"B: expected shape (..., {n}, m) to match A, got {tuple(B.shape)}")
    delta = torch.as_tensor(delta, dtype=A.dtype, device=A.device)[..., None, None]
    m = B.shape[-1]
    lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], delta.shape[:-2])
    top = torch.cat([(delta * A).expand(*lead, n, n), (delta * B).expand(*lead, n, m)], dim=-1)
    bottom = A.new_zeros(*lead, m, n + m)
    block = torch.linalg.matrix_exp(torch.cat([top, bottom], dim=-2))
    return block[..., :n, :n], block[..., :n, n:]


def exp_trapezoidal(
    delta: torch.Tensor, A: torch.Tensor, lam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mamba-3's exponential-trapezoidal rule: h_t = alpha h_{t-1} + beta B x_{t-1} + gamma B x_t.

    alpha = exp(Delta A), beta = (1 - lambda) Delta alpha, gamma = lambda Delta. lambda = 1 is
    Euler (Mamba-2), lambda = 1/2 the classic trapezoid (second order).

    Args: delta, A, lam broadcastable (diagonal A; lam in [0, 1]). Returns (alpha, beta, gamma).
    """
    alpha = torch.exp(delta * A)
    return alpha, (1 - lam) * delta * alpha, lam * delta
