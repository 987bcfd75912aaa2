"""Rotary phase and rotated keys/queries for the Triton Mamba-3 path, as custom ops with backward.

``rotary_phase_triton``: phi_t = (phi0 + sum_{s <= t} pi tanh(angles_s) dt_s) mod 2 pi per batch
and head, one program per batch, head and block of angles walking the sequence (reverse cumulative
sum for the backward).

``rotate_heads``: per head and MIMO rank, keys K = Rot(phi)(B + B_bias) and queries
Q = Rot(phi)(C + C_bias).

B holds one row per rank and group of heads (b, l, r, g, n); the phase phi differs per head
(b, l, h, a) and is shared by the ranks, so the rotated keys are per head (b, l, r, h, n), one
launch per rank writing its slice in place of a concatenation. Each program turns keys and
queries by one cos/sin per angle, working on the rotated pairs as two (tokens, angles) tiles, the
first and second entries of every pair. Forward: one program per block of tokens and head. Backward: one program
per block of tokens and group, which sums its heads' gradients back into the group's rows
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

from .._backend import cdiv, next_power_of_2
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
def _with_bias(f, s, bias_ptr, hi, first, second, mask_a, N: tl.constexpr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        f += tl.load(bias_ptr + hi * N + first, mask=mask_a, other=0.0)[None, :]
        s += tl.load(bias_ptr + hi * N + second, mask=mask_a, other=0.0)[None, :]
    return f, s


@triton.jit
def _cos_sin(phi_row, mask_t, WIDTH: tl.constexpr, NA: tl.constexpr):
    """cos and sin of a block of tokens' angles, (BLOCK_T, WIDTH), angle 0 past the NA given."""
    offs_j = tl.arange(0, WIDTH)
    phi = tl.load(phi_row + offs_j[None, :], mask=mask_t[:, None] & (offs_j < NA)[None, :], other=0.0)
    return tl.cos(phi), tl.sin(phi)


@triton.jit
def _rotate_split(v_row, bias_ptr, out_row, hi, cos, sin, mask_t, N: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """Interleaved pairs, power-of-two N: each row loaded whole, split into its even and odd entries
    in registers, rotated (cos, sin (BLOCK_T, N / 2), angle 0 past the last pair) and stored whole."""
    offs_n = tl.arange(0, N)
    v = tl.load(v_row + offs_n[None, :], mask=mask_t[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + hi * N + offs_n)[None, :]
    f, s = tl.split(tl.reshape(v, (BLOCK_T, N // 2, 2)))
    out = tl.reshape(tl.join(cos * f - sin * s, sin * f + cos * s), (BLOCK_T, N))
    tl.store(out_row + offs_n[None, :], out.to(out_row.dtype.element_ty), mask=mask_t[:, None])


@triton.jit
def _rotate_pairs(v_row, bias_ptr, out_row, hi, cos, sin, mask_t, N: tl.constexpr, NA: tl.constexpr,
                  NP: tl.constexpr, AP: tl.constexpr, HALVES: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Any layout and N: the rotated pairs as (BLOCK_T, AP) tiles of first and second entries, the
    unpaired entries copied."""
    offs_j = tl.arange(0, AP)
    first, second = _pair_entries(offs_j, N, HALVES)
    mask_j = mask_t[:, None] & (offs_j < NA)[None, :]
    f = tl.load(v_row + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
    s = tl.load(v_row + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
    f, s = _with_bias(f, s, bias_ptr, hi, first, second, offs_j < NA, N, HAS_BIAS)
    tl.store(out_row + first[None, :], (cos * f - sin * s).to(out_row.dtype.element_ty), mask=mask_j)
    tl.store(out_row + second[None, :], (sin * f + cos * s).to(out_row.dtype.element_ty), mask=mask_j)
    offs_n = tl.arange(0, NP)
    rest = _unpaired(offs_n, N, NA, HALVES)
    mask_rest = mask_t[:, None] & rest[None, :]
    v = tl.load(v_row + offs_n[None, :], mask=mask_rest, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + hi * N + offs_n, mask=rest, other=0.0)[None, :]
    tl.store(out_row + offs_n[None, :], v.to(out_row.dtype.element_ty), mask=mask_rest)


@triton.jit
def rotate_heads_fwd_kernel(
    b_ptr, c_ptr, b_bias_ptr, c_bias_ptr, phi_ptr, k_ptr, q_ptr, rows, in_row, out_row,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NA: tl.constexpr, NP: tl.constexpr, AP: tl.constexpr,
    HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One block of tokens of one head: its keys and queries turned by one cos/sin per angle. Rows
    of B, C start every in_row elements, those of K, Q every out_row (one rank of several)."""
    pid_t, hi = tl.program_id(0), tl.program_id(1)
    gi = hi // (H // G)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_t = offs_t < rows
    group_at = (offs_t * in_row + gi * N)[:, None]
    head_at = (offs_t * out_row + hi * N)[:, None]
    phi_row = phi_ptr + ((offs_t * H + hi) * NA)[:, None]
    if not HALVES and N == NP:
        cos, sin = _cos_sin(phi_row, mask_t, N // 2, NA)
        _rotate_split(b_ptr + group_at, b_bias_ptr, k_ptr + head_at, hi, cos, sin, mask_t, N, HAS_BIAS, BLOCK_T)
        _rotate_split(c_ptr + group_at, c_bias_ptr, q_ptr + head_at, hi, cos, sin, mask_t, N, HAS_BIAS, BLOCK_T)
    else:
        cos, sin = _cos_sin(phi_row, mask_t, AP, NA)
        _rotate_pairs(b_ptr + group_at, b_bias_ptr, k_ptr + head_at, hi, cos, sin, mask_t, N, NA, NP, AP, HALVES,
                      HAS_BIAS)
        _rotate_pairs(c_ptr + group_at, c_bias_ptr, q_ptr + head_at, hi, cos, sin, mask_t, N, NA, NP, AP, HALVES,
                      HAS_BIAS)


@triton.jit
def _head_grads(dout_row, f, s, cos, sin, first, second, mask_j, offs_n, mask_rest):
    """One head's gradient through its rotation: d(out) -> (d first, d second, d unpaired entries,
    d(phi) per pair = d_second out_first - d_first out_second)."""
    df = tl.load(dout_row + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
    ds = tl.load(dout_row + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
    dr = tl.load(dout_row + offs_n[None, :], mask=mask_rest, other=0.0).to(tl.float32)
    dphi = ds * (cos * f - sin * s) - df * (sin * f + cos * s)
    return cos * df + sin * ds, cos * ds - sin * df, dr, dphi


@triton.jit
def _store_bias_sums(partial, da, db, dr, first, second, offs_n, mask_a, rest):
    tl.store(partial + first, tl.sum(da, 0), mask=mask_a)
    tl.store(partial + second, tl.sum(db, 0), mask=mask_a)
    tl.store(partial + offs_n, tl.sum(dr, 0), mask=rest)


@triton.jit
def _store_rows(row, d_first, d_second, d_rest, first, second, offs_n, mask_j, mask_rest):
    tl.store(row + first[None, :], d_first.to(row.dtype.element_ty), mask=mask_j)
    tl.store(row + second[None, :], d_second.to(row.dtype.element_ty), mask=mask_j)
    tl.store(row + offs_n[None, :], d_rest.to(row.dtype.element_ty), mask=mask_rest)


@triton.jit
def rotate_heads_bwd_kernel(
    dk_ptr, dq_ptr, b_ptr, c_ptr, b_bias_ptr, c_bias_ptr, phi_ptr, db_ptr, dc_ptr, db_bias_ptr, dc_bias_ptr,
    dphi_ptr, rows, in_row, out_row,
    H: tl.constexpr, G: tl.constexpr, N: tl.constexpr, NA: tl.constexpr, NP: tl.constexpr, AP: tl.constexpr,
    HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, ADD_DPHI: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One block of tokens of one group, its heads in turn: the keys' and queries' gradients turned
    back and summed over the heads into the group's rows (no atomics); d(phi) of both, per token,
    head and angle (added to what dphi holds with ADD_DPHI: the ranks after the first); the bias
    gradients as this program's per-head sums ((programs, h, n) each). Row strides as the forward's,
    for B, C, dB, dC (in_row) and dK, dQ (out_row)."""
    pid_t, gi = tl.program_id(0), tl.program_id(1)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    mask_t = offs_t < rows
    offs_j = tl.arange(0, AP)
    mask_a = offs_j < NA
    first, second = _pair_entries(offs_j, N, HALVES)
    mask_j = mask_t[:, None] & mask_a[None, :]
    offs_n = tl.arange(0, NP)
    rest = _unpaired(offs_n, N, NA, HALVES)
    mask_rest = mask_t[:, None] & rest[None, :]
    group_at = (offs_t * in_row + gi * N)[:, None]
    fb0 = tl.load(b_ptr + group_at + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
    sb0 = tl.load(b_ptr + group_at + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
    fc0 = tl.load(c_ptr + group_at + first[None, :], mask=mask_j, other=0.0).to(tl.float32)
    sc0 = tl.load(c_ptr + group_at + second[None, :], mask=mask_j, other=0.0).to(tl.float32)
    db_first = tl.zeros((BLOCK_T, AP), dtype=tl.float32)
    db_second = tl.zeros((BLOCK_T, AP), dtype=tl.float32)
    db_rest = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    dc_first = tl.zeros((BLOCK_T, AP), dtype=tl.float32)
    dc_second = tl.zeros((BLOCK_T, AP), dtype=tl.float32)
    dc_rest = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for k in range(H // G):
        hi = gi * (H // G) + k
        phi_at = ((offs_t * H + hi) * NA)[:, None] + offs_j[None, :]
        phi = tl.load(phi_ptr + phi_at, mask=mask_j, other=0.0)
        cos, sin = tl.cos(phi), tl.sin(phi)
        head_at = (offs_t * out_row + hi * N)[:, None]
        fb, sb = _with_bias(fb0, sb0, b_bias_ptr, hi, first, second, mask_a, N, HAS_BIAS)
        dbf, dbs, dbr, dphi_b = _head_grads(dk_ptr + head_at, fb, sb, cos, sin, first, second, mask_j, offs_n,
                                            mask_rest)
        fc, sc = _with_bias(fc0, sc0, c_bias_ptr, hi, first, second, mask_a, N, HAS_BIAS)
        dcf, dcs, dcr, dphi_c = _head_grads(dq_ptr + head_at, fc, sc, cos, sin, first, second, mask_j, offs_n,
                                            mask_rest)
        dphi = dphi_b + dphi_c
        if ADD_DPHI:
            dphi += tl.load(dphi_ptr + phi_at, mask=mask_j, other=0.0)
        tl.store(dphi_ptr + phi_at, dphi, mask=mask_j)
        db_first += dbf
        db_second += dbs
        db_rest += dbr
        dc_first += dcf
        dc_second += dcs
        dc_rest += dcr
        if HAS_BIAS:
            _store_bias_sums(db_bias_ptr + (pid_t * H + hi) * N, dbf, dbs, dbr, first, second, offs_n, mask_a, rest)
            _store_bias_sums(dc_bias_ptr + (pid_t * H + hi) * N, dcf, dcs, dcr, first, second, offs_n, mask_a, rest)
    _store_rows(db_ptr + group_at, db_first, db_second, db_rest, first, second, offs_n, mask_j, mask_rest)
    _store_rows(dc_ptr + group_at, dc_first, dc_second, dc_rest, first, second, offs_n, mask_j, mask_rest)


def _sizes(n: int, n_angles: int) -> dict:
    return dict(NP=next_power_of_2(n), AP=next_power_of_2(max(n_angles, 1)))


def _rank_bias(bias: Optional[Tensor], k: int) -> Optional[Tensor]:
    """Rank k's (h, n) float32 rows of a (h, r, n) bias, contiguous (a small copy)."""
    return None if bias is None else bias[:, k].contiguous()


def _rotate_heads(B: Tensor, C: Tensor, B_bias: Optional[Tensor], C_bias: Optional[Tensor], phi: Tensor,
                  halves: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """B, C (rows, r, g, n), biases (h, r, n) float32 (both or neither), phi (rows, h, a) float32,
    all contiguous -> K, Q (rows, r, h, n) in ``out_dtype``: head j rotates group j // (h // g)'s
    rows of each rank plus the rank's bias."""
    rows, r, g, n = B.shape
    h, n_angles = phi.shape[1], phi.shape[2]
    K = torch.empty(rows, r, h, n, device=B.device, dtype=out_dtype)
    Q = torch.empty_like(K)
    for k in range(r):
        launch(rotate_heads_fwd_kernel, (cdiv(rows, FWD_LAUNCH["BLOCK_T"]), h),
            B[:, k], C[:, k], _rank_bias(B_bias, k), _rank_bias(C_bias, k), phi, K[:, k], Q[:, k], rows, r * g * n,
            r * h * n, H=h, G=g, N=n, NA=n_angles, **_sizes(n, n_angles), HALVES=halves,
            HAS_BIAS=B_bias is not None, **FWD_LAUNCH)
    return K, Q


rotate_heads_op = torch.library.custom_op("mambakit::rotate_heads", _rotate_heads, mutates_args=())


@rotate_heads_op.register_fake
def _(B, C, B_bias, C_bias, phi, halves, out_dtype):
    rows, r, g, n = B.shape
    K = B.new_empty(rows, r, phi.shape[1], n, dtype=out_dtype)
    return K, torch.empty_like(K)


def _rotate_heads_bwd(dK: Tensor, dQ: Tensor, B: Tensor, C: Tensor, B_bias: Optional[Tensor],
                      C_bias: Optional[Tensor], phi: Tensor, halves: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dK, dQ (rows, r, h, n) contiguous -> (dB like B, dC like C, dB_bias and dC_bias (h, r, n)
    float32 (empty without biases), dphi like phi, summed over the ranks)."""
    rows, r, g, n = B.shape
    h, n_angles = phi.shape[1], phi.shape[2]
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    programs = cdiv(rows, BWD_LAUNCH["BLOCK_T"])
    has_bias = B_bias is not None
    dB_bias, dC_bias = ((B.new_empty(r, programs, h, n, dtype=F32) if has_bias else B.new_empty(0, dtype=F32))
                        for _ in range(2))
    dphi = torch.empty_like(phi)
    for k in range(r):
        launch(rotate_heads_bwd_kernel, (programs, g),
            dK[:, k], dQ[:, k], B[:, k], C[:, k], _rank_bias(B_bias, k), _rank_bias(C_bias, k), phi, dB[:, k],
            dC[:, k], dB_bias[k] if has_bias else dB_bias, dC_bias[k] if has_bias else dC_bias, dphi, rows,
            r * g * n, r * h * n, H=h, G=g, N=n, NA=n_angles, **_sizes(n, n_angles), HALVES=halves,
            HAS_BIAS=has_bias, ADD_DPHI=k > 0, **BWD_LAUNCH)
    if has_bias:
        dB_bias, dC_bias = (t.sum(1).transpose(0, 1).contiguous() for t in (dB_bias, dC_bias))
    return dB, dC, dB_bias, dC_bias, dphi


rotate_heads_bwd = torch.library.custom_op("mambakit::rotate_heads_bwd", _rotate_heads_bwd, mutates_args=())


@rotate_heads_bwd.register_fake
def _(dK, dQ, B, C, B_bias, C_bias, phi, halves):
    h, r, n = phi.shape[1], B.shape[1], B.shape[3]
    biases = [B.new_empty(h, r, n, dtype=F32) if B_bias is not None else B.new_empty(0, dtype=F32) for _ in range(2)]
    return torch.empty_like(B), torch.empty_like(C), *biases, torch.empty_like(phi)


def _setup(ctx, inputs, output):
    B, C, B_bias, C_bias, phi, halves, _ = inputs
    ctx.save_for_backward(B, C, B_bias, C_bias, phi)
    ctx.halves = halves


def _backward(ctx, dK, dQ):
    B, C, B_bias, C_bias, phi = ctx.saved_tensors
    dB, dC, dB_bias, dC_bias, dphi = rotate_heads_bwd(dK.contiguous(), dQ.contiguous(), B, C, B_bias, C_bias, phi,
                                                      ctx.halves)
    has_bias = B_bias is not None
    return dB, dC, (dB_bias if has_bias else None), (dC_bias if has_bias else None), dphi, None, None


rotate_heads_op.register_autograd(_backward, setup_context=_setup)


def _rotate_forward_and_backward(B, C, B_bias, C_bias, phi, halves, out_dtype, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    K, Q = _rotate_heads(B, C, B_bias, C_bias, phi, halves, out_dtype)
    if backward:
        _rotate_heads_bwd(K, Q, B, C, B_bias, C_bias, phi, halves)


def rotate_heads(B: Tensor, C: Tensor, B_bias: Optional[Tensor], C_bias: Optional[Tensor], phi: Tensor,
                 halves: bool, out_dtype: torch.dtype, backward: bool) -> tuple[Tensor, Tensor]:
    """The ``rotate_heads`` op (see the op): keys K = Rot(phi)(B + B_bias) and queries
    Q = Rot(phi)(C + C_bias) in one pass, one cos/sin per angle for both; B, C (rows, r, g, n),
    biases (h, r, n), phi (rows, h, a) -> K, Q (rows, r, h, n). A bias given alone is
    paired with zeros (the kernels take both or neither). Kernels compiled ahead on a first call,
    those of the backward too if ``backward`` (a gradient will follow)."""
    if (B_bias is None) != (C_bias is None):
        B_bias = torch.zeros_like(C_bias) if B_bias is None else B_bias
        C_bias = torch.zeros_like(B_bias) if C_bias is None else C_bias
    compile_ahead("rotate_heads", _rotate_forward_and_backward, B, C, B_bias, C_bias, phi, halves, out_dtype, backward)
    return rotate_heads_op(B, C, B_bias, C_bias, phi, halves, out_dtype)


@triton.jit
def rotary_phase_fwd_kernel(
    angles_ptr, dt_ptr, phi0_ptr, phi_ptr, length, sa_b, sa_l, sa_h, sdt_b, sdt_l,
    H: tl.constexpr, NA: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """phi_t = (phi0 + sum_{s <= t} pi tanh(angles_s) dt_s) mod 2 pi for one (batch, head) and
    block of angles: the running phase is reduced mod 2 pi after every block of tokens, so float32
    keeps it to ~1e-7 rad per block."""
    pid, pid_a = tl.program_id(0), tl.program_id(1)
    bi, hi = (pid // H).to(tl.int64), pid % H
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
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
    H: tl.constexpr, NA: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """d(inc_t) = sum_{s >= t} dphi_s (a reverse cumulative sum, block by block from the end), then
    dangles = d(inc) pi dt (1 - tanh^2), ddt = sum_a d(inc) pi tanh (added over the blocks of
    angles into a zeroed ddt), dphi0 = sum_t dphi_t."""
    pid, pid_a = tl.program_id(0), tl.program_id(1)
    bi, hi = (pid // H).to(tl.int64), pid % H
    offs_a = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    mask_a = offs_a < NA
    after = tl.zeros((BLOCK_A,), dtype=tl.float32)  # sum of dphi over the tokens after the block
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
        if NA <= BLOCK_A:
            tl.store(ddt_ptr + (bi * length + offs_l) * H + hi, ddt, mask=mask_l)
        else:
            tl.atomic_add(ddt_ptr + (bi * length + offs_l) * H + hi, ddt, mask=mask_l, sem="relaxed")
    tl.store(dphi0_ptr + (bi * H + hi) * NA + offs_a, after, mask=mask_a)


PHASE_BLOCK_L = 64
# Angles per program: the (batch, head) programs alone (256 at b 8, h 32) left the H200 mostly idle
# walking the sequence; blocks of angles multiply them.
PHASE_BLOCK_A = 8


def _phase_launch(n_angles: int) -> tuple[int, dict]:
    """(programs along the angles, the kernels' angle and token blocks)."""
    block_a = min(PHASE_BLOCK_A, next_power_of_2(n_angles))
    return cdiv(n_angles, block_a), dict(NA=n_angles, BLOCK_A=block_a, BLOCK_L=PHASE_BLOCK_L)


def _rotary_phase(angles: Tensor, dt: Tensor, phi0: Tensor) -> Tensor:
    """angles (b, l, h, a) any strides, dt (b, l, h) float32, phi0 (b, h, a) float32 contiguous ->
    phi (b, l, h, a) float32 contiguous, in [0, 2 pi)."""
    b, length, h, n_angles = angles.shape
    phi = torch.empty(b, length, h, n_angles, device=angles.device, dtype=F32)
    if n_angles:
        angle_blocks, blocks = _phase_launch(n_angles)
        launch(rotary_phase_fwd_kernel, (b * h, angle_blocks),
            angles, dt, phi0, phi, length, angles.stride(0), angles.stride(1), angles.stride(2), dt.stride(0),
            dt.stride(1), H=h, **blocks)
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
        angle_blocks, blocks = _phase_launch(n_angles)
        launch(rotary_phase_bwd_kernel, (b * h, angle_blocks),
            dphi, angles, dt, dangles, ddt, dphi0, length, angles.stride(0), angles.stride(1), angles.stride(2),
            dt.stride(0), dt.stride(1), H=h, **blocks)
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
