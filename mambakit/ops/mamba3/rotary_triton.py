"""Fused rotary keys/queries for the Triton Mamba-3 path: per head, K = Rot(phi)(B + bias).

B holds one row per group of heads (b, l, g, n); the phase phi differs per head (b, l, h, a), so
the rotated keys are per head (b, l, h, n). One program takes a block of tokens and one group:
it reads the group's rows once and writes every head of the group (forward), or sums the heads'
gradients back into the group's rows without atomics (backward). The bias gradient (summed over
tokens) and the phase gradient (per token and head) come from the same pass.

Rotation of pair (f, s) by angle phi: (f, s) -> (cos f - sin s, sin f + cos s); its transpose
rotates by -phi, and d(out)/d(phi) = (-out_s, out_f).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

F32 = torch.float32
BLOCK_T = 32


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
def rotate_heads_fwd_kernel(
    v_ptr, bias_ptr, phi_ptr, out_ptr, rows,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NA: tl.constexpr, NP: tl.constexpr,
    HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t, gi = tl.program_id(0), tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, NP)
    mask_t = offs_t < rows
    mask = mask_t[:, None] & (offs_n[None, :] < N)
    angle, partner, first, rotated = _pairs(offs_n, N, NA, HALVES)
    v_row = v_ptr + (offs_t[:, None] * G + gi) * N
    v = tl.load(v_row + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    v_partner = tl.load(v_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(first, -1.0, 1.0)
    for k in range(H // G):
        hi = gi * (H // G) + k
        a, b = v, v_partner
        if HAS_BIAS:
            a += tl.load(bias_ptr + hi * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            b += tl.load(bias_ptr + hi * N + partner, mask=offs_n < N, other=0.0)[None, :]
        phi = tl.load(phi_ptr + (offs_t[:, None] * H + hi) * NA + angle[None, :], mask=mask & rotated[None, :],
                      other=0.0)
        out = tl.where(rotated[None, :], tl.cos(phi) * a + sign[None, :] * tl.sin(phi) * b, a)
        tl.store(out_ptr + (offs_t[:, None] * H + hi) * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def rotate_heads_bwd_kernel(
    dout_ptr, v_ptr, bias_ptr, phi_ptr, dv_ptr, dbias_ptr, dphi_ptr, rows,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NA: tl.constexpr, NP: tl.constexpr,
    HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_t, gi = tl.program_id(0), tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    offs_n = tl.arange(0, NP)
    mask_t = offs_t < rows
    mask = mask_t[:, None] & (offs_n[None, :] < N)
    angle, partner, first, rotated = _pairs(offs_n, N, NA, HALVES)
    v_row = v_ptr + (offs_t[:, None] * G + gi) * N
    v = tl.load(v_row + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    v_partner = tl.load(v_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    sign = tl.where(first, -1.0, 1.0)
    dv = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for k in range(H // G):
        hi = gi * (H // G) + k
        a, b = v, v_partner
        if HAS_BIAS:
            a += tl.load(bias_ptr + hi * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            b += tl.load(bias_ptr + hi * N + partner, mask=offs_n < N, other=0.0)[None, :]
        phi_at = (offs_t[:, None] * H + hi) * NA + angle[None, :]
        phi = tl.load(phi_ptr + phi_at, mask=mask & rotated[None, :], other=0.0)
        cos, sin = tl.cos(phi), tl.sin(phi)
        dout_row = dout_ptr + (offs_t[:, None] * H + hi) * N
        d = tl.load(dout_row + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        d_partner = tl.load(dout_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        # Transpose rotation: d(entry) = cos d_entry - sign sin d_partner.
        dk = tl.where(rotated[None, :], cos * d - sign[None, :] * sin * d_partner, d)
        dv += dk
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + hi * N + offs_n, tl.sum(dk, 0), mask=offs_n < N, sem="relaxed")
        # d(phi) = -d_f out_s + d_s out_f: each entry adds d_entry * (sign-flipped rotated partner).
        out_partner = cos * b - sign[None, :] * sin * a
        contribution = tl.where(mask & rotated[None, :], sign[None, :] * d * out_partner, 0.0)
        tl.atomic_add(dphi_ptr + phi_at, contribution, mask=mask & rotated[None, :], sem="relaxed")
    tl.store(dv_ptr + (offs_t[:, None] * G + gi) * N + offs_n[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("mambakit::rotate_heads", mutates_args=())
def rotate_heads(v: Tensor, bias: Optional[Tensor], phi: Tensor, halves: bool, out_dtype: torch.dtype) -> Tensor:
    """v (rows, g, n), bias (h, n) float32 or None, phi (rows, h, a) float32, all contiguous ->
    (rows, h, n) in ``out_dtype``: head j rotates group j // (h // g)'s row plus bias[j]."""
    rows, g, n = v.shape
    h, n_angles = phi.shape[1], phi.shape[2]
    out = torch.empty(rows, h, n, device=v.device, dtype=out_dtype)
    rotate_heads_fwd_kernel[(triton.cdiv(rows, BLOCK_T), g)](
        v, bias, phi, out, rows, H=h, G=g, N=n, NA=n_angles, NP=triton.next_power_of_2(n), HALVES=halves,
        HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T)
    return out


@rotate_heads.register_fake
def _(v, bias, phi, halves, out_dtype):
    return v.new_empty(v.shape[0], phi.shape[1], v.shape[2], dtype=out_dtype)


@torch.library.custom_op("mambakit::rotate_heads_bwd", mutates_args=())
def rotate_heads_bwd(dout: Tensor, v: Tensor, bias: Optional[Tensor], phi: Tensor, halves: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dv like v, dbias (h, n) float32 (empty without bias), dphi like phi)."""
    rows, g, n = v.shape
    h, n_angles = phi.shape[1], phi.shape[2]
    dv = torch.empty_like(v)
    dbias = torch.zeros(h, n, device=v.device, dtype=F32) if bias is not None else v.new_empty(0, dtype=F32)
    dphi = torch.zeros_like(phi)
    rotate_heads_bwd_kernel[(triton.cdiv(rows, BLOCK_T), g)](
        dout, v, bias, phi, dv, dbias, dphi, rows, H=h, G=g, N=n, NA=n_angles, NP=triton.next_power_of_2(n),
        HALVES=halves, HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T)
    return dv, dbias, dphi


@rotate_heads_bwd.register_fake
def _(dout, v, bias, phi, halves):
    return (torch.empty_like(v), v.new_empty(phi.shape[1], v.shape[2], dtype=F32) if bias is not None
            else v.new_empty(0, dtype=F32), torch.empty_like(phi))


def _setup(ctx, inputs, output):
    v, bias, phi, halves, _ = inputs
    ctx.save_for_backward(v, bias, phi)
    ctx.halves = halves


def _backward(ctx, dout):
    v, bias, phi = ctx.saved_tensors
    dv, dbias, dphi = rotate_heads_bwd(dout.contiguous(), v, bias, phi, ctx.halves)
    return dv, (dbias if bias is not None else None), dphi, None, None


rotate_heads.register_autograd(_backward, setup_context=_setup)
