"""Triton kernel of the Mamba-3 decode step (SISO and MIMO), registered as the custom op
``mambakit::mamba3_step`` (it mutates the four state tensors; a fake impl lets ``torch.compile``
trace it without graph breaks).

Layout: one program per (batch row, head), because the head's phase, rotated keys K_prev and
x_prev are read and rewritten in place. It advances the phase, rotates the r keys and queries
(RP, NP) in registers, stores the new phase and keys (after a barrier: the old keys stay in
registers for the trapezoid's previous-token term), then walks the head's channels in blocks of
BLOCK_P: the (BLOCK_P, n) slice of H is updated in float32 and written back, y is its products with
the queries, plus D, gated and mixed over the ranks. The rank sums go through (RP, BLOCK_P, NP)
products, so BLOCK_P shrinks as r grows. Strided activations are read where they lie.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import next_power_of_2


@triton.jit
def _pairs(offs_n, N: tl.constexpr, NA: tl.constexpr, HALVES: tl.constexpr):
    """-> (angle index, partner index, whether the entry is the first of its pair, rotated?) per
    state entry."""
    if HALVES:
        first = offs_n < NA
        second = (offs_n >= N // 2) & (offs_n < N // 2 + NA)
        angle = tl.where(first, offs_n, offs_n - N // 2)
        partner = tl.where(first, offs_n + N // 2, offs_n - N // 2)
    else:
        first = (offs_n < 2 * NA) & (offs_n % 2 == 0)
        second = (offs_n < 2 * NA) & (offs_n % 2 == 1)
        angle = offs_n // 2
        partner = offs_n ^ 1
    rotated = first | second
    return tl.where(rotated, angle, 0), tl.where(rotated, partner, offs_n), first, rotated


@triton.jit
def mamba3_step_kernel(
    p_x, p_dt, p_A, p_trap, p_ang, p_B, p_C, p_phi, p_H, p_K, p_xp,
    p_D, p_z, p_bb, p_cb, p_mx, p_mz, p_mo, p_y,
    heads, dim_p, heads_per_group,
    sx_b, sx_h, sdt_b, sdt_h, sA_b, sA_h, str_b, str_h, sang_b, sang_h,
    sB_b, sB_r, sB_g, sC_b, sC_r, sC_g, sphi_b, sphi_h, sH_b, sH_h, sH_p, sK_b, sK_r, sK_h, sxp_b, sxp_h,
    sz_b, sz_h,
    R: tl.constexpr, RP: tl.constexpr, N: tl.constexpr, NP: tl.constexpr, NA: tl.constexpr,
    BLOCK_P: tl.constexpr, HALVES: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BBIAS: tl.constexpr, HAS_CBIAS: tl.constexpr, MIMO: tl.constexpr, MIX: tl.constexpr,
):
    """Inner axes (channels, state entries, angles) have unit stride; fp32 math."""
    i_bh = tl.program_id(0)
    i_b, i_h = (i_bh // heads).to(tl.int64), i_bh % heads
    i_g = i_h // heads_per_group
    o_r = tl.arange(0, RP)
    o_n = tl.arange(0, NP)
    m_r, m_n = o_r < R, o_n < N
    m_rn = m_r[:, None] & m_n[None, :]

    dt = tl.load(p_dt + i_b * sdt_b + i_h * sdt_h).to(tl.float32)
    A = tl.load(p_A + i_b * sA_b + i_h * sA_h).to(tl.float32)
    lam = tl.sigmoid(tl.load(p_trap + i_b * str_b + i_h * str_h).to(tl.float32))
    alpha = tl.exp(dt * A)
    gamma = lam * dt
    beta = (1.0 - lam) * dt * alpha

    # Phase of every state entry's pair (entries in no pair get angle 0: no rotation).
    angle, partner, first, rotated = _pairs(o_n, N, NA, HALVES)
    m_rot = rotated & m_n
    raw = tl.load(p_ang + i_b * sang_b + i_h * sang_h + angle, mask=m_rot, other=0.0).to(tl.float32)
    phi = tl.load(p_phi + i_b * sphi_b + i_h * sphi_h + angle, mask=m_rot, other=0.0)
    two_pi = 6.283185307179586
    # tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both tails
    phi = phi + 3.141592653589793 * (1.0 - 2.0 / (tl.exp(2.0 * raw) + 1.0)) * dt
    phi = phi - two_pi * tl.floor(phi / two_pi)
    cos, sin = tl.cos(phi)[None, :], tl.sin(phi)[None, :]
    sign = tl.where(first, -1.0, 1.0)[None, :]

    # Keys and queries of the r ranks, (RP, NP): Rot(phi)(v + bias) = cos v + sign sin v_partner.
    rows_B = p_B + i_b * sB_b + o_r[:, None] * sB_r + i_g * sB_g
    Bv = tl.load(rows_B + o_n[None, :], mask=m_rn, other=0.0).to(tl.float32)
    Bp = tl.load(rows_B + partner[None, :], mask=m_rn, other=0.0).to(tl.float32)
    rows_C = p_C + i_b * sC_b + o_r[:, None] * sC_r + i_g * sC_g
    Cv = tl.load(rows_C + o_n[None, :], mask=m_rn, other=0.0).to(tl.float32)
    Cp = tl.load(rows_C + partner[None, :], mask=m_rn, other=0.0).to(tl.float32)
    bias_rows = (i_h * R + o_r[:, None]) * N
    if HAS_BBIAS:
        Bv += tl.load(p_bb + bias_rows + o_n[None, :], mask=m_rn, other=0.0)
        Bp += tl.load(p_bb + bias_rows + partner[None, :], mask=m_rn, other=0.0)
    if HAS_CBIAS:
        Cv += tl.load(p_cb + bias_rows + o_n[None, :], mask=m_rn, other=0.0)
        Cp += tl.load(p_cb + bias_rows + partner[None, :], mask=m_rn, other=0.0)
    K = cos * Bv + sign * sin * Bp
    Q = cos * Cv + sign * sin * Cp
    rows_K = p_K + i_b * sK_b + o_r[:, None] * sK_r + i_h * sK_h + o_n[None, :]
    K_prev = tl.load(rows_K, mask=m_rn, other=0.0).to(tl.float32)

    # Every entry's old phase and key is loaded before any is overwritten.
    tl.debug_barrier()
    tl.store(p_phi + i_b * sphi_b + i_h * sphi_h + angle, phi, mask=first & m_n)
    tl.store(rows_K, K.to(p_K.dtype.element_ty), mask=m_rn)

    if HAS_D:
        D = tl.load(p_D + i_h).to(tl.float32)
    for p0 in range(0, dim_p, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < dim_p
        m_rp = m_r[:, None] & m_p[None, :]
        x = tl.load(p_x + i_b * sx_b + i_h * sx_h + o_p, mask=m_p, other=0.0).to(tl.float32)
        x_prev = tl.load(p_xp + i_b * sxp_b + i_h * sxp_h + o_p, mask=m_p, other=0.0).to(tl.float32)
        if MIMO:
            scale = tl.load(p_mx + (i_h * R + o_r[:, None]) * dim_p + o_p[None, :], mask=m_rp, other=0.0)
        else:
            scale = tl.where(m_rp, 1.0, 0.0)
        v, v_prev = scale * x[None, :], scale * x_prev[None, :]  # (RP, BLOCK_P)

        o_H = i_b * sH_b + i_h * sH_h + o_p[:, None] * sH_p + o_n[None, :]
        m_H = m_p[:, None] & m_n[None, :]
        H = tl.load(p_H + o_H, mask=m_H, other=0.0)
        u = tl.sum(v[:, :, None] * K[:, None, :], axis=0)
        u_prev = tl.sum(v_prev[:, :, None] * K_prev[:, None, :], axis=0)
        H = alpha * H + beta * u_prev + gamma * u
        tl.store(p_H + o_H, H, mask=m_H)

        y = tl.sum(H[None, :, :] * Q[:, None, :], axis=2)  # (RP, BLOCK_P)
        if HAS_D:
            y += D * v
        if HAS_Z:
            z = tl.load(p_z + i_b * sz_b + i_h * sz_h + o_p, mask=m_p, other=0.0).to(tl.float32)[None, :]
            if MIMO:
                z = z * tl.load(p_mz + (i_h * R + o_r[:, None]) * dim_p + o_p[None, :], mask=m_rp, other=0.0)
            y = y * z * tl.sigmoid(z)
        if MIX:
            if MIMO:
                y = y * tl.load(p_mo + (i_h * R + o_r[:, None]) * dim_p + o_p[None, :], mask=m_rp, other=0.0)
            tl.store(p_y + i_bh.to(tl.int64) * dim_p + o_p, tl.sum(y, axis=0).to(p_y.dtype.element_ty), mask=m_p)
        else:
            tl.store(p_y + (i_bh.to(tl.int64) * R + o_r[:, None]) * dim_p + o_p[None, :],
                     y.to(p_y.dtype.element_ty), mask=m_rp)
        tl.debug_barrier()  # this block's x_prev is read everywhere before it is replaced
        tl.store(p_xp + i_b * sxp_b + i_h * sxp_h + o_p, x.to(p_xp.dtype.element_ty), mask=m_p)


def _block_p(p: int, rp: int, np_: int) -> int:
    """Channels per block: (rp, BLOCK_P, n) products of at most 8192 fp32 (64 per thread, 4 warps)."""
    return max(1, min(next_power_of_2(p), 8192 // (rp * np_)))


def _inner_contiguous(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or t.stride(-1) == 1 for t in tensors)


@torch.library.custom_op("mambakit::mamba3_step", mutates_args=("phi", "H", "K_prev", "x_prev"))
def mamba3_step_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, trap: Tensor, angles: Tensor,
                   phi: Tensor, H: Tensor, K_prev: Tensor, x_prev: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                   B_bias: Optional[Tensor], C_bias: Optional[Tensor], mimo_x: Optional[Tensor],
                   mimo_z: Optional[Tensor], mimo_o: Optional[Tensor], halves: bool) -> Tensor:
    """Shapes as :func:`mambakit.ops.mamba3.step.mamba3_step_reference`; every tensor with a unit
    inner stride, the parameters (D, biases, mimo_*) contiguous, phi and H float32."""
    b, h, p = x.shape
    r, g, n = B.shape[1:]
    mix = r == 1 or mimo_o is not None
    y = torch.empty((b, h, p) if mix else (b, h, r, p), device=x.device, dtype=x.dtype)
    rp, np_ = next_power_of_2(r), max(2, next_power_of_2(n))
    z_strides = z.stride()[:2] if z is not None else (0, 0)
    mamba3_step_kernel[(b * h,)](
        x, dt, A, trap, angles, B, C, phi, H, K_prev, x_prev, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, y,
        h, p, h // g,
        *x.stride()[:2], *dt.stride(), *A.stride(), *trap.stride(), *angles.stride()[:2],
        *B.stride()[:3], *C.stride()[:3], *phi.stride()[:2], *H.stride()[:3], *K_prev.stride()[:3],
        *x_prev.stride()[:2], *z_strides,
        R=r, RP=rp, N=n, NP=np_, NA=angles.shape[2], BLOCK_P=_block_p(p, rp, np_), HALVES=halves,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BBIAS=B_bias is not None, HAS_CBIAS=C_bias is not None,
        MIMO=r > 1, MIX=mix,
    )
    return y


@mamba3_step_op.register_fake
def _(x, dt, A, B, C, trap, angles, phi, H, K_prev, x_prev, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, halves):
    b, h, p = x.shape
    r = B.shape[1]
    return x.new_empty((b, h, p) if r == 1 or mimo_o is not None else (b, h, r, p))


def mamba3_step_triton(x, dt, A, B, C, trap, angles, state, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o,
                       halves: bool) -> Tensor:
    """Triton path of :func:`mambakit.ops.mamba3.mamba3_step` (inputs validated; float32 phi and H,
    the state tensors written in place, so they must have a unit inner stride)."""
    phi, H, K_prev, x_prev = state
    if phi.dtype != torch.float32 or H.dtype != torch.float32:
        raise ValueError(f"state: the Triton Mamba-3 step keeps phi and H in float32, got {phi.dtype} and {H.dtype}")
    if not _inner_contiguous(phi, H, K_prev, x_prev):
        raise ValueError("state: the Triton Mamba-3 step writes the state in place and needs each tensor's last "
                         "axis contiguous")

    def unit(t):
        return t if t is None or t.stride(-1) == 1 else t.contiguous()

    def c(t):
        return None if t is None else t.contiguous()

    return mamba3_step_op(unit(x), dt, A, unit(B), unit(C), trap, unit(angles), phi, H, K_prev, x_prev, c(D),
                          unit(z), c(B_bias), c(C_bias), c(mimo_x), c(mimo_z), c(mimo_o), halves)
