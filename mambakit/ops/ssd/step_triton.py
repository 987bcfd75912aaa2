"""Triton kernel of the Mamba-2 decode step, registered as the custom op ``mambakit::ssd_step``
(it mutates ``state``; a fake impl lets ``torch.compile`` trace it without graph breaks).

Layout: one program per (batch row, head, block of BLOCK_P head channels). It loads its
(BLOCK_P, n) slice of the state, the head's dt, A, and its group's B and C (n,), updates the slice
in float32 and writes it back in place; y is the slice's row sums against C. Strided x, dt, B, C,
z and state are read where they lie (the mixer passes views of its in_proj output, no copies).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import cdiv, next_power_of_2

_DEFAULT_DT_LIMIT = (0.0, float("inf"))


@triton.jit
def _softplus(x):
    # log(1 + e^x), accurate for small e^x (the log1p identity log(u) e / (u - 1), u = 1 + e);
    # the identity above 20 like torch's threshold.
    e = tl.exp(x)
    u = 1.0 + e
    small = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    return tl.where(x <= 20.0, small, x)


@triton.jit
def ssd_step_kernel(
    p_x, p_dt, p_A, p_B, p_C, p_state, p_D, p_z, p_bias, p_y,
    heads, dim_p, heads_per_group, dt_lo, dt_hi,
    sx_b, sx_h, sx_p, sdt_b, sdt_h, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n,
    ss_b, ss_h, ss_p, ss_n, sz_b, sz_h, sz_p,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
):
    """state = exp(dt A) state + dt x B^T; y = state C + D x, gated by silu(z). fp32 math."""
    i_bh, i_pb = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // heads, i_bh % heads
    i_g = i_h // heads_per_group
    o_p = i_pb * BLOCK_P + tl.arange(0, BLOCK_P)
    o_n = tl.arange(0, NP)
    m_p, m_n = o_p < dim_p, o_n < N
    m_pn = m_p[:, None] & m_n[None, :]

    dt = tl.load(p_dt + i_b * sdt_b + i_h * sdt_h).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(p_bias + i_h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_lo), dt_hi)
    A = tl.load(p_A + i_h).to(tl.float32)
    x = tl.load(p_x + i_b * sx_b + i_h * sx_h + o_p * sx_p, mask=m_p, other=0.0).to(tl.float32)
    Bv = tl.load(p_B + i_b * sB_b + i_g * sB_g + o_n * sB_n, mask=m_n, other=0.0).to(tl.float32)
    Cv = tl.load(p_C + i_b * sC_b + i_g * sC_g + o_n * sC_n, mask=m_n, other=0.0).to(tl.float32)

    # int64 offsets: the state is the one operand that can pass 2^31 elements.
    o_state = i_b.to(tl.int64) * ss_b + i_h * ss_h + o_p[:, None] * ss_p + o_n[None, :] * ss_n
    s = tl.load(p_state + o_state, mask=m_pn, other=0.0)
    s = tl.exp2(dt * A * 1.4426950408889634) * s + (dt * x)[:, None] * Bv[None, :]
    tl.store(p_state + o_state, s, mask=m_pn)

    y = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_CHANNEL:
            Dv = tl.load(p_D + i_h * dim_p + o_p, mask=m_p, other=0.0).to(tl.float32)
        else:
            Dv = tl.load(p_D + i_h).to(tl.float32)
        y += Dv * x
    if HAS_Z:
        zv = tl.load(p_z + i_b * sz_b + i_h * sz_h + o_p * sz_p, mask=m_p, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(p_y + i_bh * dim_p + o_p, y.to(p_y.dtype.element_ty), mask=m_p)


def _block_p(p: int, np_: int) -> int:
    """Channels per program: a state tile of at most 2048 fp32 (16 per thread with 4 warps)."""
    return min(next_power_of_2(p), max(1, 2048 // np_))


@torch.library.custom_op("mambakit::ssd_step", mutates_args=("state",))
def ssd_step(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, state: Tensor, D: Optional[Tensor],
             z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, dt_lo: float,
             dt_hi: float) -> Tensor:
    """x (b, h, p), dt (b, h), A (h,), B/C (b, g, n), state (b, h, p, n) fp32 updated in place,
    D (h,) or (h, p) contiguous, z (b, h, p), dt_bias (h,) -> y (b, h, p) contiguous in x's dtype."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    np_ = max(2, next_power_of_2(n))
    block_p = _block_p(p, np_)
    zs = z.stride() if z is not None else (0, 0, 0)
    ssd_step_kernel[(b * h, cdiv(p, block_p))](
        x, dt, A, B, C, state, D, z, dt_bias, y,
        h, p, h // g, dt_lo, dt_hi,
        *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *state.stride(), *zs,
        N=n, NP=np_, BLOCK_P=block_p,
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=(dt_lo, dt_hi) != _DEFAULT_DT_LIMIT,
    )
    return y


@ssd_step.register_fake
def _(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_lo, dt_hi):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def ssd_step_triton(x, dt, A, B, C, state, D=None, z=None, dt_bias=None, dt_softplus=False,
                    dt_limit=_DEFAULT_DT_LIMIT):
    """Triton path of :func:`mambakit.ops.ssd.ssd_step` (inputs validated, float32 state)."""
    def c(t):
        return None if t is None else t.contiguous()

    lo, hi = dt_limit
    return ssd_step(x, dt, c(A), B, C, state, c(D), z, c(dt_bias), dt_softplus, float(lo), float(hi))
