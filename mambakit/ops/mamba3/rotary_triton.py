"""Rotary phase and rotated keys/queries for the Triton Mamba-3 path, as custom ops with backward.

``rotary_phase_triton``: phi_t = (phi0 + sum_{s <= t} pi tanh(angles_s) dt_s) mod 2 pi per batch
and head, one program walking the sequence (reverse cumulative sum for the backward).

``rotate_heads``: per head, K = Rot(phi)(B + bias).

B holds one row per group of heads (b, l, g, n); the phase phi differs per head (b, l, h, a), so
the rotated keys are per head (b, l, h, n). Each program works on the rotated pairs as two
(tokens, angles) tiles, the first and second entries of every pair, with one cos/sin per angle. Forward: one program per block of tokens and head. Backward: one
program per block of tokens and group, which sums its heads' gradients back into the group's rows
without atomics and writes the phase gradient per token, head and angle; the bias gradient comes
as per-program sums, added up after.

Rotation of pair (f, s) by angle phi: (f, s) -> (cos f - sin s, sin f + cos s); its transpose
rotates by -phi, and d(out)/d(phi) = (-out_s, out_f).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._compile import compile_ahead, launch

F32 = torch.float32
# Tokens per program (the forward's grid also spans heads) and warps: the fastest on the H200 at
# 32768 tokens, 32 heads, n 128 (benchmarks/NOTES.md, Mamba-3 SISO).
FWD_LAUNCH = dict(BLOCK_T=16, num_warps=8)
BWD_LAUNCH = dict(BLOCK_T=8, num_warps=1)


@triton.jit
def _pair_entries(offs_j, N: tl.constexpr, HALVES: tl.constexpr):
    """Pair j's two state entries: (j, j + N/2) in halves, (2j, 2j + 1) interleaved."""
    if HALVES:
        return offs_j, offs_j + N // 2
    return 2 * offs_j, 2 * offs_j + 1


@triton.jit
def _unpaired(offs_n, N: tl.constexpr, NA: tl.constexpr, HALVES: tl.constexpr):
    """Whether each state entry is in no rotated pair (it passes through unchanged)."""
    if HALVES:
        paired = (offs_n < NA) | ((offs_n >= N // 2) & (offs_n < N // 2 + NA))
    else:
        paired = offs_n < 2 * NA
    return (offs_n < N) & (paired == 0)


@triton.jit
def rotate_heads_fwd_kernel(
    v_ptr, bias_ptr, phi_ptr, out_ptr, rows,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NA: tl.constexpr, NP: tl.constexpr, AP: tl.constexpr,
    HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One block of tokens of one head, one cos/sin per angle. Interleaved pairs of a power-of-two
    state size: the row loaded whole and split into its even and odd entries in registers.
    Otherwise: the rotated pairs as (BLOCK_T, AP) tiles of first and second entries, the unpaired
    entries copied."""
    pid_t, hi = tl.program_id(0), tl.program_id(1)
    gi = hi // (H // G)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_t = offs_t < rows
    v_row = v_ptr + ((offs_t * G + gi) * N)[:, None]
    out_row = out_ptr + ((offs_t * H + hi) * N)[:, None]
    phi_row = phi_ptr + ((offs_t * H + hi) * NA)[:, None]
    if not HALVES and N == NP:
        offs_n = tl.arange(0, N)
        v = tl.load(v_row + offs_n[None, :], mask=mask_t[:, None], other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + hi * N + offs_n)[None, :]
        f, s = tl.split(tl.reshape(v, (BLOCK_T, N // 2, 2)))
        offs_j = tl.arange(0, N // 2)
        phi = tl.load(phi_row + offs_j[None, :], mask=mask_t[:, None] & (offs_j < NA)[None, :], other=0.0)
        cos, sin = tl.cos(phi), tl.sin(phi)  # angle 0 (cos 1, sin 0) on the unpaired entries
        out = tl.reshape(tl.join(cos * f - sin * s, sin * f + cos * s), (BLOCK_T, N))
        tl.store(out_row + offs_n[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_t[:, None])
    else:
        offs_j = tl.arange(0, AP)
        first, second = _pair_entries(offs_j, N, HALVES)
        mask_j = mask_t[:, None] & (offs_j < NA)[None, :]
        f = tl.load(v_row + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
        s = tl.load(v_row + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
        if HAS_BIAS:
            f += tl.load(bias_ptr + hi * N + first, mask=offs_j < NA, other=0.0)[None, :]
            s += tl.load(bias_ptr + hi * N + second, mask=offs_j < NA, other=0.0)[None, :]
        phi = tl.load(phi_row + offs_j[None, :], mask=mask_j, other=0.0)
        cos, sin = tl.cos(phi), tl.sin(phi)
        tl.store(out_row + first[None, :], (cos * f - sin * s).to(out_ptr.dtype.element_ty), mask=mask_j)
        tl.store(out_row + second[None, :], (sin * f + cos * s).to(out_ptr.dtype.element_ty), mask=mask_j)
        offs_n = tl.arange(0, NP)
        rest = _unpaired(offs_n, N, NA, HALVES)
        mask_rest = mask_t[:, None] & rest[None, :]
        v = tl.load(v_row + offs_n[None, :], mask=mask_rest, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + hi * N + offs_n, mask=rest, other=0.0)[None, :]
        tl.store(out_row + offs_n[None, :], v.to(out_ptr.dtype.element_ty), mask=mask_rest)


@triton.jit
def rotate_heads_bwd_kernel(
    dout_ptr, v_ptr, bias_ptr, phi_ptr, dv_ptr, dbias_ptr, dphi_ptr, rows,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NA: tl.constexpr, NP: tl.constexpr, AP: tl.constexpr,
    HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One block of tokens of one group, its heads in turn: d(pair) by the transposed rotation,
    summed over the heads into the group's rows; d(phi) = d_second out_first - d_first out_second
    per pair; the bias gradient as this program's per-head sums (dbias (programs, h, n))."""
    pid_t, gi = tl.program_id(0), tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_t = offs_t < rows
    offs_j = tl.arange(0, AP)
    first, second = _pair_entries(offs_j, N, HALVES)
    mask_j = mask_t[:, None] & (offs_j < NA)[None, :]
    offs_n = tl.arange(0, NP)
    rest = _unpaired(offs_n, N, NA, HALVES)
    mask_rest = mask_t[:, None] & rest[None, :]
    v_row = v_ptr + ((offs_t * G + gi) * N)[:, None]
    f0 = tl.load(v_row + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
    s0 = tl.load(v_row + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
    d_first = tl.zeros((BLOCK_T, AP), dtype=tl.float32)
    d_second = tl.zeros((BLOCK_T, AP), dtype=tl.float32)
    d_rest = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for k in range(H // G):
        hi = gi * (H // G) + k
        f, s = f0, s0
        if HAS_BIAS:
            f += tl.load(bias_ptr + hi * N + first, mask=offs_j < NA, other=0.0)[None, :]
            s += tl.load(bias_ptr + hi * N + second, mask=offs_j < NA, other=0.0)[None, :]
        phi_at = ((offs_t * H + hi) * NA)[:, None] + offs_j[None, :]
        phi = tl.load(phi_ptr + phi_at, mask=mask_j, other=0.0)
        cos, sin = tl.cos(phi), tl.sin(phi)
        dout_row = dout_ptr + ((offs_t * H + hi) * N)[:, None]
        df = tl.load(dout_row + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
        ds = tl.load(dout_row + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
        dr = tl.load(dout_row + offs_n[None, :], mask=mask_rest, other=0.0).to(tl.float32)
        tl.store(dphi_ptr + phi_at, ds * (cos * f - sin * s) - df * (sin * f + cos * s), mask=mask_j)
        da = cos * df + sin * ds
        db = cos * ds - sin * df
        d_first += da
        d_second += db
        d_rest += dr
        if HAS_BIAS:
            partial = dbias_ptr + (pid_t * H + hi) * N
            tl.store(partial + first, tl.sum(da, 0), mask=offs_j < NA)
            tl.store(partial + second, tl.sum(db, 0), mask=offs_j < NA)
            tl.store(partial + offs_n, tl.sum(dr, 0), mask=rest)
    dv_row = dv_ptr + ((offs_t * G + gi) * N)[:, None]
    tl.store(dv_row + first[None, :], d_first.to(dv_ptr.dtype.element_ty), mask=mask_j)
    tl.store(dv_row + second[None, :], d_second.to(dv_ptr.dtype.element_ty), mask=mask_j)
    tl.store(dv_row + offs_n[None, :], d_rest.to(dv_ptr.dtype.element_ty), mask=mask_rest)


def _sizes(n: int, n_angles: int) -> dict:
    return dict(NP=triton.next_power_of_2(n), AP=triton.next_power_of_2(max(n_angles, 1)))


def _rotate_heads(v: Tensor, bias: Optional[Tensor], phi: Tensor, halves: bool, out_dtype: torch.dtype) -> Tensor:
    """v (rows, g, n), bias (h, n) float32 or None, phi (rows, h, a) float32, all contiguous ->
    (rows, h, n) in ``out_dtype``: head j rotates group j // (h // g)'s row plus bias[j]."""
    rows, g, n = v.shape
    h, n_angles = phi.shape[1], phi.shape[2]
    out = torch.empty(rows, h, n, device=v.device, dtype=out_dtype)
    launch(rotate_heads_fwd_kernel, (triton.cdiv(rows, FWD_LAUNCH["BLOCK_T"]), h),
        v, bias, phi, out, rows, H=h, G=g, N=n, NA=n_angles, **_sizes(n, n_angles), HALVES=halves,
        HAS_BIAS=bias is not None, **FWD_LAUNCH)
    return out


rotate_heads_op = torch.library.custom_op("mambakit::rotate_heads", _rotate_heads, mutates_args=())


@rotate_heads_op.register_fake
def _(v, bias, phi, halves, out_dtype):
    return v.new_empty(v.shape[0], phi.shape[1], v.shape[2], dtype=out_dtype)


def _rotate_heads_bwd(dout: Tensor, v: Tensor, bias: Optional[Tensor], phi: Tensor, halves: bool
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dv like v, dbias (h, n) float32 (empty without bias), dphi like phi)."""
    rows, g, n = v.shape
    h, n_angles = phi.shape[1], phi.shape[2]
    dv = torch.empty_like(v)
    programs = triton.cdiv(rows, BWD_LAUNCH["BLOCK_T"])
    dbias = v.new_empty(programs, h, n, dtype=F32) if bias is not None else v.new_empty(0, dtype=F32)
    dphi = torch.empty_like(phi)
    launch(rotate_heads_bwd_kernel, (programs, g),
        dout, v, bias, phi, dv, dbias, dphi, rows, H=h, G=g, N=n, NA=n_angles, **_sizes(n, n_angles),
        HALVES=halves, HAS_BIAS=bias is not None, **BWD_LAUNCH)
    if bias is not None:
        dbias = dbias.sum(0)
    return dv, dbias, dphi


rotate_heads_bwd = torch.library.custom_op("mambakit::rotate_heads_bwd", _rotate_heads_bwd, mutates_args=())


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


rotate_heads_op.register_autograd(_backward, setup_context=_setup)


def _rotate_forward_and_backward(v, bias, phi, halves, out_dtype, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    out = _rotate_heads(v, bias, phi, halves, out_dtype)
    if backward:
        _rotate_heads_bwd(torch.empty_like(out), v, bias, phi, halves)


def rotate_heads(v: Tensor, bias: Optional[Tensor], phi: Tensor, halves: bool, out_dtype: torch.dtype,
                 backward: bool) -> Tensor:
    """The ``rotate_heads`` op (see the op), its kernels compiled ahead on a first call, those of
    its backward too if ``backward`` (a gradient will follow)."""
    compile_ahead("rotate_heads", _rotate_forward_and_backward, v, bias, phi, halves, out_dtype, backward)
    return rotate_heads_op(v, bias, phi, halves, out_dtype)


@triton.jit
def rotary_phase_fwd_kernel(
    angles_ptr, dt_ptr, phi0_ptr, phi_ptr, length, sa_b, sa_l, sa_h, sdt_b, sdt_l,
    H: tl.constexpr, NA: tl.constexpr, AP: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """phi_t = (phi0 + sum_{s <= t} pi tanh(angles_s) dt_s) mod 2 pi for one (batch, head): the
    running phase is reduced mod 2 pi after every block, so float32 keeps it to ~1e-7 rad per block."""
    pid = tl.program_id(0)
    bi, hi = (pid // H).to(tl.int64), pid % H
    offs_a = tl.arange(0, AP)
    mask_a = offs_a < NA
    carry = tl.load(phi0_ptr + (bi * H + hi) * NA + offs_a, mask=mask_a, other=0.0)
    two_pi = 6.283185307179586
    for l0 in range(0, length, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask = (offs_l[:, None] < length) & mask_a[None, :]
        raw = tl.load(angles_ptr + bi * sa_b + offs_l.to(tl.int64)[:, None] * sa_l + hi * sa_h + offs_a[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + bi * sdt_b + offs_l.to(tl.int64) * sdt_l + hi, mask=offs_l < length, other=0.0)
        # tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both tails
        inc = 3.141592653589793 * (1.0 - 2.0 / (tl.exp(2.0 * raw) + 1.0)) * dt[:, None]
        phi = carry[None, :] + tl.cumsum(inc, 0)
        phi = phi - two_pi * tl.floor(phi / two_pi)
        tl.store(phi_ptr + ((bi * length + offs_l.to(tl.int64))[:, None] * H + hi) * NA + offs_a[None, :], phi,
                 mask=mask)
        carry = carry + tl.sum(inc, 0)
        carry = carry - two_pi * tl.floor(carry / two_pi)


@triton.jit
def rotary_phase_bwd_kernel(
    dphi_ptr, angles_ptr, dt_ptr, dangles_ptr, ddt_ptr, dphi0_ptr, length, sa_b, sa_l, sa_h, sdt_b, sdt_l,
    H: tl.constexpr, NA: tl.constexpr, AP: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """d(inc_t) = sum_{s >= t} dphi_s (a reverse cumulative sum, block by block from the end), then
    dangles = d(inc) pi dt (1 - tanh^2), ddt = sum_a d(inc) pi tanh, dphi0 = sum_t dphi_t."""
    pid = tl.program_id(0)
    bi, hi = (pid // H).to(tl.int64), pid % H
    offs_a = tl.arange(0, AP)
    mask_a = offs_a < NA
    after = tl.zeros((AP,), dtype=tl.float32)  # sum of dphi over the tokens after the block
    n_blocks = tl.cdiv(length, BLOCK_L)
    for i in range(n_blocks):
        l0 = (n_blocks - 1 - i) * BLOCK_L
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < length
        mask = mask_l[:, None] & mask_a[None, :]
        rows = (bi * length + offs_l.to(tl.int64))[:, None] * H + hi
        dphi = tl.load(dphi_ptr + rows * NA + offs_a[None, :], mask=mask, other=0.0)
        dinc = after[None, :] + tl.sum(dphi, 0)[None, :] - tl.cumsum(dphi, 0) + dphi
        after += tl.sum(dphi, 0)
        raw = tl.load(angles_ptr + bi * sa_b + offs_l.to(tl.int64)[:, None] * sa_l + hi * sa_h + offs_a[None, :],
                      mask=mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + bi * sdt_b + offs_l.to(tl.int64) * sdt_l + hi, mask=mask_l, other=0.0)
        th = 1.0 - 2.0 / (tl.exp(2.0 * raw) + 1.0)
        pi = 3.141592653589793
        tl.store(dangles_ptr + rows * NA + offs_a[None, :], dinc * pi * dt[:, None] * (1.0 - th * th), mask=mask)
        ddt = tl.sum(tl.where(mask, dinc * pi * th, 0.0), 1)
        tl.store(ddt_ptr + (bi * length + offs_l) * H + hi, ddt, mask=mask_l)
    tl.store(dphi0_ptr + (bi * H + hi) * NA + offs_a, after, mask=mask_a)


PHASE_BLOCK_L = 64


def _rotary_phase(angles: Tensor, dt: Tensor, phi0: Tensor) -> Tensor:
    """angles (b, l, h, a) any strides, dt (b, l, h) float32, phi0 (b, h, a) float32 contiguous ->
    phi (b, l, h, a) float32 contiguous, in [0, 2 pi)."""
    b, length, h, n_angles = angles.shape
    phi = torch.empty(b, length, h, n_angles, device=angles.device, dtype=F32)
    if n_angles:
        launch(rotary_phase_fwd_kernel, (b * h,),
            angles, dt, phi0, phi, length, angles.stride(0), angles.stride(1), angles.stride(2), dt.stride(0),
            dt.stride(1), H=h, NA=n_angles, AP=triton.next_power_of_2(n_angles), BLOCK_L=PHASE_BLOCK_L)
    return phi


rotary_phase_op = torch.library.custom_op("mambakit::rotary_phase", _rotary_phase, mutates_args=())


@rotary_phase_op.register_fake
def _(angles, dt, phi0):
    return angles.new_empty(angles.shape, dtype=F32)


def _rotary_phase_bwd(dphi: Tensor, angles: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dangles (b, l, h, a) float32, ddt (b, l, h) float32, dphi0 (b, h, a) float32)."""
    b, length, h, n_angles = angles.shape
    dangles = torch.empty(b, length, h, n_angles, device=angles.device, dtype=F32)
    ddt = torch.zeros(b, length, h, device=angles.device, dtype=F32)
    dphi0 = torch.zeros(b, h, n_angles, device=angles.device, dtype=F32)
    if n_angles:
        launch(rotary_phase_bwd_kernel, (b * h,),
            dphi, angles, dt, dangles, ddt, dphi0, length, angles.stride(0), angles.stride(1), angles.stride(2),
            dt.stride(0), dt.stride(1), H=h, NA=n_angles, AP=triton.next_power_of_2(n_angles), BLOCK_L=PHASE_BLOCK_L)
    return dangles, ddt, dphi0


rotary_phase_bwd = torch.library.custom_op("mambakit::rotary_phase_bwd", _rotary_phase_bwd, mutates_args=())


@rotary_phase_bwd.register_fake
def _(dphi, angles, dt):
    b, length, h, n_angles = angles.shape
    return (angles.new_empty(angles.shape, dtype=F32), dt.new_empty(b, length, h, dtype=F32),
            dt.new_empty(b, h, n_angles, dtype=F32))


def _phase_setup(ctx, inputs, output):
    angles, dt, _ = inputs
    ctx.save_for_backward(angles, dt)


def _phase_backward(ctx, dphi):
    angles, dt = ctx.saved_tensors
    dangles, ddt, dphi0 = rotary_phase_bwd(dphi.contiguous(), angles, dt)
    return dangles.to(angles.dtype), ddt, dphi0


rotary_phase_op.register_autograd(_phase_backward, setup_context=_phase_setup)


def _phase_forward_and_backward(angles, dt, phi0, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    phi = _rotary_phase(angles, dt, phi0)
    if backward:
        _rotary_phase_bwd(torch.empty_like(phi), angles, dt)


def rotary_phase_triton(angles: Tensor, dt: Tensor, phi0: Tensor, backward: bool) -> Tensor:
    """The ``rotary_phase`` op (see the op), its kernels compiled ahead on a first call, those of
    its backward too if ``backward`` (a gradient will follow)."""
    compile_ahead("rotary_phase", _phase_forward_and_backward, angles, dt, phi0, backward)
    return rotary_phase_op(angles, dt, phi0)
