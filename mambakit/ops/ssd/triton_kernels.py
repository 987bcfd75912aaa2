"""Triton kernels of the Mamba-2 SSD scan (MATH.md section 3), forward and backward.

Notation, per batch row and head: tokens are cut into chunks of T; within chunk c, ``a_t = dt_t A``,
``cum_t`` is the cumulative sum of a from the chunk's first token through t, and ``S_c`` the
(p, n) state entering the chunk. With ``M[t, s] = exp(cum_t - cum_s) dt_s`` for s <= t (zero
across a packed-sequence boundary):

    y_t     = exp(cum_t) S_c C_t + sum_{s<=t} (C_t . B_s) M[t, s] x_s          (+ D x_t, * silu(z_t))
    S_{c+1} = exp(cum_last) S_c + sum_s exp(cum_last - cum_s) dt_s x_s B_s^T

Forward, two kernels (three with a split walk, four when it saves for a backward):
- ``ssd_fwd_state_kernel``: one program per (batch, head, block of p, block of n, segment) walks
  its segment of chunks (the whole sequence when there is one) in blocks of BLOCK_T tokens,
  carrying the state in registers (chunk states and the state passing between chunks in one pass);
  stores S_c at each chunk start, the state it ends with, and the discretized dt and the in-chunk
  cumsum of dt A for the other kernels. With several segments (too few programs to fill the GPU)
  the later ones start from zero; ``ssd_fwd_entry_kernel`` then builds the state entering each
  segment, E_s (``entry``), the final state, and what each chunk start keeps of its segment's
  entering state (``kept``, from the cumsums). Without a backward to follow, the chunk states stay
  segment-local: the output kernel reads kept_c C_t E_s as a second product beside C_t states_c,
  which spares the forward a pass that rewrites them. With one, ``ssd_complete_states_kernel``
  completes the later segments' states in place first (the backward reads whole states).
- ``ssd_fwd_output_kernel``: one program per (batch, one or two heads of a group, chunk, block of
  rows, block of p), the equation for y_t above; two heads share each C B^T block.

Backward, four kernels (six with a split walk):
- ``ssd_bwd_state_kernel``: the reverse walk, carrying dL/dS, in segments as the forward's; stores
  the gradient of each chunk's end state and of the initial state, and the gradients at the output
  (dy through the gate, dz, D). After a split walk ``ssd_bwd_entry_kernel`` builds the gradient
  entering each segment from its end (and dh0), and ``ssd_bwd_complete_kernel`` adds its share
  into the chunks' gradients in place.
- ``ssd_bwd_dx_kernel``: per (batch, group, chunk, block of source tokens s), looping over the
  group's heads: dx, dB (summed over the heads in registers), and the parts of dL/dcum at s.
- ``ssd_bwd_dc_kernel``: per (batch, group, chunk, block of target tokens t): dC and the parts of
  dL/dcum at t, from the whole chunk states the forward saved.
- ``ssd_bwd_dt_kernel``: per (batch, head, chunk): dL/da from dL/dcum (a reverse cumsum), then
  through dt = clamp(softplus(dt + dt_bias)) to the raw dt, dA and d dt_bias.

Layouts: x, z (b, l, h, p), dt (b, l, h), B, C (b, l, g, n) with any batch and token strides (the
rest packed: views into a projection's output are read in place, strides ``s<name>_b``,
``s<name>_l``); outputs and gradients contiguous in the same shapes; states
(b, n_chunks, h, p, n) and their gradients in bfloat16 for bfloat16 inputs, else float32; dt and cumsum scratch (b, h, l) float32; seg (b, l) int64
canonical segment ids (0, 0, 1, 1, ...: equal ids <=> same packed sequence).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Triton's interpreter (how CI runs the kernels on CPU) multiplies bfloat16 matrices wrongly
# (triton 3.9); there the operands of every product are widened to float32 first, which gives the
# same result as the GPU's exact half-precision products with float32 accumulation.
_WIDEN_PRODUCTS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    # (if/else with one return: Triton compiles the code after a static if's early return too)
    if _WIDEN_PRODUCTS:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PREC)
    return out


# Largest k x n state tile (padded) that _state_dot multiplies as bfloat16 parts.
SPLIT_STATE_TILE = tl.constexpr(32 * 32)


@triton.jit
def _state_dot(a, S, PREC: tl.constexpr, NARROW: tl.constexpr):
    """a (m, k) in the input dtype times a float32 state operand S (k, n). With NARROW (bfloat16
    inputs, bfloat16 states) S is rounded to a's dtype for the tensor cores. Other half-precision
    inputs (float16; bfloat16 with float32 states, Mamba-3) split S into two bfloat16 parts,
    hi + lo (~16 significant bits), and a float16 a into two exact ones, in bfloat16 products:
    more precise than one tf32 product, and without it: triton 3.6 compiled tf32 products of
    float32-widened tiles beside the kernels' half products, at k x n <= 32 x 32 state tiles, into
    illegal shared-memory reads and wrong gradients on the H200; at larger tiles the split products
    hit the same kind of fault (p 32, n 64) and the widened tf32 product is the one verified there
    (benchmarks/NOTES.md). float32 inputs, and half inputs at larger tiles: float32 products."""
    if NARROW:
        out = _dot(a, S.to(a.dtype), PREC)
    elif (a.dtype.is_bf16() or a.dtype.is_fp16()) and a.shape[1] * S.shape[1] <= SPLIT_STATE_TILE:
        S = S.to(tl.float32)
        s_hi = S.to(tl.bfloat16)
        s_lo = (S - s_hi.to(tl.float32)).to(tl.bfloat16)
        if a.dtype.is_bf16():
            out = _dot(a, s_hi, PREC) + _dot(a, s_lo, PREC)
        else:  # float16's 11 bits = bfloat16's 8 + an exact bfloat16 remainder of at most 3
            a32 = a.to(tl.float32)
            a_hi = a32.to(tl.bfloat16)
            a_lo = (a32 - a_hi.to(tl.float32)).to(tl.bfloat16)
            out = _dot(a_hi, s_hi, PREC) + _dot(a_hi, s_lo, PREC) + _dot(a_lo, s_hi, PREC)
    else:
        out = _dot(a.to(tl.float32), S.to(tl.float32), PREC)
    return out


@triton.jit
def _discretize(raw, bias, lo, hi, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr):
    v = raw
    if HAS_BIAS:
        v = v + bias
    if SOFTPLUS:
        # torch's softplus with threshold 20: the identity above it.
        v = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
    if CLAMP:
        v = tl.minimum(tl.maximum(v, lo), hi)
    return v


@triton.jit
def ssd_fwd_state_kernel(
    x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, h0_ptr, seg_ptr,
    states_ptr, seg_final_ptr, dtp_ptr, cum_ptr,
    length, n_chunks, dt_lo, dt_hi, sx_b, sx_l, sdt_b, sdt_l, sB_b, sB_l,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_SEQ: tl.constexpr, PER_TOKEN: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr, SEGMENTS: tl.constexpr,
    SEGMENT_CHUNKS: tl.constexpr,
):
    # Walks the chunks of one segment (SEGMENT_CHUNKS chunks; all of them when SEGMENTS == 1), the
    # first from the initial state, the others from zero; what enters each later segment is added
    # where the chunk states are read. (What a chunk start keeps of its segment's entering state
    # is left to ssd_fwd_entry_kernel, which reads it from the cumsums: one more float carried
    # here made the whole-n tile spill, 0.112 -> 0.128 ms at b8 l4096 in two segments.)
    pid_p, pid_n, pid_bhs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_bh = pid_bhs // SEGMENTS
    segment = pid_bhs % SEGMENTS
    seg_start = segment * SEGMENT_CHUNKS * CHUNK
    seg_end = tl.minimum(seg_start + SEGMENT_CHUNKS * CHUNK, length)
    bi = (pid_bh // H).to(tl.int64)
    hi = pid_bh % H
    gi = hi // (H // G)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_pn = (offs_p[:, None] < P) & (offs_n[None, :] < N)
    pn_offs = offs_p[:, None] * N + offs_n[None, :]
    if not PER_TOKEN:
        A = tl.load(A_ptr + hi).to(tl.float32)
    bias = tl.load(bias_ptr + hi).to(tl.float32) if HAS_BIAS else 0.0
    S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_H0:
        if segment == 0:
            S = tl.load(h0_ptr + (bi * H + hi) * P * N + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
    writes_dt = (pid_p == 0) & (pid_n == 0)
    chunk_cum = tl.sum(tl.zeros((BLOCK_T,), dtype=tl.float32), 0)
    if HAS_SEQ:
        seg_prev = tl.load(seg_ptr + bi * length + tl.maximum(seg_start - 1, 0))
    for t0 in range(seg_start, seg_end, BLOCK_T):
        chunk_cum = tl.where(t0 % CHUNK == 0, 0.0, chunk_cum)
        if t0 % CHUNK == 0:
            tl.store(states_ptr + ((bi * n_chunks + t0 // CHUNK) * H + hi) * P * N + pn_offs,
                     S.to(states_ptr.dtype.element_ty), mask=mask_pn)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < length
        rows = bi * length + offs_t
        raw = tl.load(dt_ptr + bi * sdt_b + offs_t.to(tl.int64) * sdt_l + hi, mask=mask_t, other=0.0).to(tl.float32)
        dt = tl.where(mask_t, _discretize(raw, bias, dt_lo, dt_hi, HAS_BIAS, SOFTPLUS, CLAMP), 0.0)
        if PER_TOKEN:  # A holds each token's log-decay, (b, l, h) contiguous
            a = tl.load(A_ptr + rows * H + hi, mask=mask_t, other=0.0).to(tl.float32)
        else:
            a = dt * A
        local = tl.cumsum(a, 0)
        total = tl.sum(a, 0)
        if writes_dt:
            scratch = (bi * H + hi) * length + offs_t
            tl.store(dtp_ptr + scratch, dt, mask=mask_t)
            tl.store(cum_ptr + scratch, chunk_cum + local, mask=mask_t)
        chunk_cum += total
        weight = tl.exp(total - local) * dt  # decay from each token to the end of the block
        carry = tl.exp(total)
        if HAS_SEQ:
            seg = tl.load(seg_ptr + rows, mask=mask_t, other=-1)
            seg_last = tl.max(seg, 0)
            weight = tl.where(seg == seg_last, weight, 0.0)
            carry = tl.where(seg_last == seg_prev, carry, 0.0)
            seg_prev = seg_last
        xs = tl.load(x_ptr + bi * sx_b + offs_t.to(tl.int64)[:, None] * sx_l + hi * P + offs_p[None, :],
                     mask=mask_t[:, None] & (offs_p[None, :] < P), other=0.0)
        Bs = tl.load(B_ptr + bi * sB_b + offs_t.to(tl.int64)[:, None] * sB_l + gi * N + offs_n[None, :],
                     mask=mask_t[:, None] & (offs_n[None, :] < N), other=0.0)
        xw = (xs.to(tl.float32) * weight[:, None]).to(xs.dtype)
        S = S * carry + _dot(tl.trans(xw), Bs, PREC)
    tl.store(seg_final_ptr + pid_bhs * P * N + pn_offs, S, mask=mask_pn)


@triton.jit
def _state_tile(pid_pn, P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """(offsets within one head's (p, n) state, mask) of the pid_pn-th BLOCK_P x BLOCK_N tile
    (p-blocks first)."""
    p_blocks = tl.cdiv(P, BLOCK_P)
    offs_p = (pid_pn % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_p[:, None] * N + offs_n[None, :], (offs_p[:, None] < P) & (offs_n[None, :] < N)


@triton.jit
def ssd_fwd_entry_kernel(
    seg_final_ptr, cum_ptr, seg_ptr, entry_ptr, final_ptr, kept_ptr, length, n_chunks,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, SEGMENTS: tl.constexpr,
    SEGMENT_CHUNKS: tl.constexpr, CHUNKS_BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pn, bh): the state entering each segment, E_0 = 0 (segment 0 walked from the initial
    # state), E_{k+1} = carry_k E_k + F_k with F_k the state segment k's walk ended with and carry_k
    # what a state keeps over segment k: exp of the sum of its chunks' log-decays (each chunk's is
    # its in-chunk cumsum at its last token), 0 if a packed sequence ends within it. Stores
    # E_0 .. E_{SEGMENTS-1} (entry), the final state E_SEGMENTS, and (p-block 0) what each chunk
    # start keeps of its segment's entering state (kept: exp of the log-decays since the segment's
    # start, 0 past a sequence's end).
    pid_pn, pid_bh = tl.program_id(0), tl.program_id(1)
    pn_offs, mask_pn = _state_tile(pid_pn, P, N, BLOCK_P, BLOCK_N)
    bh = pid_bh.to(tl.int64)
    offs_k = tl.arange(0, CHUNKS_BLOCK)
    E = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(0, SEGMENTS):
        tl.store(entry_ptr + (bh * SEGMENTS + k) * P * N + pn_offs, E.to(entry_ptr.dtype.element_ty), mask=mask_pn)
        chunks = k * SEGMENT_CHUNKS + offs_k
        in_segment = (offs_k < SEGMENT_CHUNKS) & (chunks < n_chunks)
        decay = tl.load(cum_ptr + bh * length + tl.minimum((chunks + 1) * CHUNK, length) - 1, mask=in_segment,
                        other=0.0)
        kept = tl.exp(tl.cumsum(decay, 0) - decay)
        carry = tl.exp(tl.sum(decay, 0))
        if HAS_SEQ:
            seq_row = seg_ptr + (bh // H) * length
            start = k * SEGMENT_CHUNKS * CHUNK
            entering = tl.load(seq_row + tl.maximum(start - 1, 0))
            at_chunk = tl.load(seq_row + tl.maximum(chunks * CHUNK - 1, 0), mask=in_segment, other=-1)
            kept = tl.where(at_chunk == entering, kept, 0.0)
            leaving = tl.load(seq_row + tl.minimum(start + SEGMENT_CHUNKS * CHUNK, length) - 1)
            carry = tl.where(leaving == entering, carry, 0.0)
        if pid_pn == 0:
            tl.store(kept_ptr + (bh * SEGMENTS + k) * SEGMENT_CHUNKS + offs_k, kept, mask=in_segment)
        F = tl.load(seg_final_ptr + (bh * SEGMENTS + k) * P * N + pn_offs, mask=mask_pn, other=0.0)
        E = E * carry + F
    tl.store(final_ptr + bh * P * N + pn_offs, E, mask=mask_pn)


@triton.jit
def ssd_complete_states_kernel(
    states_ptr, entry_ptr, kept_ptr, out_ptr, n_chunks, segments, seg_chunks, first_chunk,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pn, chunk - first_chunk, bh): out_c = the whole state entering chunk c after a split
    # walk, states_c + kept_c E_s (s the chunk's segment), summed in float32 (out may be states).
    pid_pn, c, pid_bh = tl.program_id(0), tl.program_id(1) + first_chunk, tl.program_id(2)
    pn_offs, mask_pn = _state_tile(pid_pn, P, N, BLOCK_P, BLOCK_N)
    bh = pid_bh.to(tl.int64)
    offs = (((bh // H) * n_chunks + c) * H + bh % H) * P * N + pn_offs
    S = tl.load(states_ptr + offs, mask=mask_pn, other=0.0).to(tl.float32)
    s = c // seg_chunks
    if s > 0:
        E = tl.load(entry_ptr + (bh * segments + s) * P * N + pn_offs, mask=mask_pn, other=0.0)
        S += tl.load(kept_ptr + bh * segments * seg_chunks + c) * E.to(tl.float32)
    tl.store(out_ptr + offs, S.to(out_ptr.dtype.element_ty), mask=mask_pn)


@triton.jit
def _entering_part(Ct, states_ptr, entry_ptr, kept_ptr, cum_t, bi, hi, c, n_chunks, segments, seg_chunks,
                   offs_p, mask_p, offs_n, mask_n, in_seq, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                   PREC: tl.constexpr, NARROW: tl.constexpr, SPLIT: tl.constexpr):
    """Head hi's rows from the state entering chunk c: exp(cum_t) S C_t, (M, BLOCK_P) float32;
    cum_t (M,) is the head's in-chunk cumsum at the rows, in_seq (M,) says which rows are still in
    the sequence that state belongs to. After a SPLIT walk S = states_c + kept_c E_s, read out as
    two products (C_t states_c + kept_c C_t E_s) rather than summed as a float32 tile first."""
    pn_offs = offs_p[None, :] * N + offs_n[:, None]
    mask = mask_n[:, None] & mask_p[None, :]
    bh = bi * H + hi
    S = tl.load(states_ptr + ((bi * n_chunks + c) * H + hi) * P * N + pn_offs, mask=mask, other=0.0)
    out = _state_dot(Ct, S, PREC, NARROW)
    if SPLIT:
        s = c // seg_chunks
        if s > 0:
            E = tl.load(entry_ptr + (bh * segments + s) * P * N + pn_offs, mask=mask, other=0.0)
            out += tl.load(kept_ptr + bh * segments * seg_chunks + c) * _state_dot(Ct, E, PREC, NARROW)
    decay_in = tl.where(in_seq, tl.exp(cum_t), 0.0)
    return out * decay_in[:, None]


@triton.jit
def _in_chunk_part(CB, keep, x_ptrs, mask_xs, cum_t, cum_s_ptrs, dt_s_ptrs, mask_s, PREC: tl.constexpr):
    """One source block's share of a head's rows: (L o C B^T)(dt x), (M, BLOCK_P) float32, with CB
    the block's C B^T (shared by the heads of a group) and keep its causal/sequence mask."""
    xs = tl.load(x_ptrs, mask=mask_xs, other=0.0)
    cum_s = tl.load(cum_s_ptrs, mask=mask_s, other=0.0)
    dt_s = tl.load(dt_s_ptrs, mask=mask_s, other=0.0)
    mix = tl.where(keep, tl.exp(tl.where(keep, cum_t[:, None] - cum_s[None, :], 0.0)), 0.0) * dt_s[None, :]
    return _dot((CB * mix).to(xs.dtype), xs, PREC)


@triton.jit
def _finish_rows(acc, x_ptrs, z_ptrs, D_ptr, hi, y_ptrs, ypre_ptrs, mask_tp, offs_p, mask_p, P: tl.constexpr,
                 HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, SAVE_PRE: tl.constexpr):
    """+ D x, the pre-gate output kept for the backward, * silu(z), stored."""
    if HAS_D:
        xt = tl.load(x_ptrs, mask=mask_tp, other=0.0).to(tl.float32)
        if D_PER_P:
            Dv = tl.load(D_ptr + hi * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            acc += xt * Dv[None, :]
        else:
            acc += xt * tl.load(D_ptr + hi).to(tl.float32)
    if HAS_Z:
        if SAVE_PRE:
            tl.store(ypre_ptrs, acc.to(ypre_ptrs.dtype.element_ty), mask=mask_tp)
        zt = tl.load(z_ptrs, mask=mask_tp, other=0.0).to(tl.float32)
        acc = acc * zt * tl.sigmoid(zt)
    tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask_tp)


@triton.jit
def ssd_fwd_output_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, z_ptr, seg_ptr, states_ptr, entry_ptr, kept_ptr, dtp_ptr, cum_ptr, y_ptr, ypre_ptr,
    length, n_chunks, segments, seg_chunks, sx_b, sx_l, sB_b, sB_l, sC_b, sC_l, sz_b, sz_l,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, SAVE_PRE: tl.constexpr,
    HAS_SEQ: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr, HEADS: tl.constexpr, PREC: tl.constexpr, NARROW: tl.constexpr, SPLIT: tl.constexpr,
):
    # Program (rows, p-block, batch x HEADS (1 or 2) heads of one group): the heads share C, B and
    # so each source block's C B^T, computed once for both.
    pid_cm, pid_p, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c = pid_cm // (CHUNK // BLOCK_M)
    chunk_start = c * CHUNK
    t_start = chunk_start + (pid_cm % (CHUNK // BLOCK_M)) * BLOCK_M
    if t_start >= length:
        return
    bi = (pid_bh // (H // HEADS)).to(tl.int64)
    h0 = (pid_bh % (H // HEADS)) * HEADS
    h1 = h0 + HEADS - 1  # == h0 for one head
    gi = h0 // (H // G)
    offs_t = t_start + tl.arange(0, BLOCK_M)
    mask_t = offs_t < length
    rows_t = bi * length + offs_t
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < P
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    scratch0 = (bi * H + h0) * length
    scratch1 = (bi * H + h1) * length
    cum_t0 = tl.load(cum_ptr + scratch0 + offs_t, mask=mask_t, other=0.0)
    if HEADS == 2:
        cum_t1 = tl.load(cum_ptr + scratch1 + offs_t, mask=mask_t, other=0.0)
    Ct = tl.load(C_ptr + bi * sC_b + offs_t.to(tl.int64)[:, None] * sC_l + gi * N + offs_n[None, :],
                 mask=mask_t[:, None] & mask_n[None, :], other=0.0)

    # The state entering the chunk, read out through C and decayed to each row.
    in_seq = tl.full((BLOCK_M,), True, tl.int1)
    if HAS_SEQ:
        seg_t = tl.load(seg_ptr + rows_t, mask=mask_t, other=-1)
        in_seq = seg_t == tl.load(seg_ptr + bi * length + tl.maximum(chunk_start - 1, 0))
    acc0 = _entering_part(Ct, states_ptr, entry_ptr, kept_ptr, cum_t0, bi, h0, c, n_chunks, segments, seg_chunks,
                          offs_p, mask_p, offs_n, mask_n, in_seq, H, P, N, PREC, NARROW, SPLIT)
    if HEADS == 2:
        acc1 = _entering_part(Ct, states_ptr, entry_ptr, kept_ptr, cum_t1, bi, h1, c, n_chunks, segments,
                              seg_chunks, offs_p, mask_p, offs_n, mask_n, in_seq, H, P, N, PREC, NARROW, SPLIT)

    # Within the chunk: (L o C B^T)(dt x), blocks of BLOCK_K source tokens up to the diagonal.
    for s0 in range(chunk_start, tl.minimum(t_start + BLOCK_M, length), BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        mask_s = offs_s < length
        Bs = tl.load(B_ptr + bi * sB_b + offs_s.to(tl.int64)[:, None] * sB_l + gi * N + offs_n[None, :],
                     mask=mask_s[:, None] & mask_n[None, :], other=0.0)
        keep = (offs_s[None, :] <= offs_t[:, None]) & mask_s[None, :]
        if HAS_SEQ:
            seg_s = tl.load(seg_ptr + bi * length + offs_s, mask=mask_s, other=-2)
            keep = keep & (seg_t[:, None] == seg_s[None, :])
        CB = _dot(Ct, tl.trans(Bs), PREC)
        x_rows = x_ptr + bi * sx_b + offs_s.to(tl.int64)[:, None] * sx_l + offs_p[None, :]
        mask_xs = mask_s[:, None] & mask_p[None, :]
        acc0 += _in_chunk_part(CB, keep, x_rows + h0 * P, mask_xs, cum_t0, cum_ptr + scratch0 + offs_s,
                               dtp_ptr + scratch0 + offs_s, mask_s, PREC)
        if HEADS == 2:
            acc1 += _in_chunk_part(CB, keep, x_rows + h1 * P, mask_xs, cum_t1, cum_ptr + scratch1 + offs_s,
                                   dtp_ptr + scratch1 + offs_s, mask_s, PREC)

    mask_tp = mask_t[:, None] & mask_p[None, :]
    out_rows = rows_t[:, None] * H * P + offs_p[None, :]  # y, y_pre: contiguous
    x_rows = x_ptr + bi * sx_b + offs_t.to(tl.int64)[:, None] * sx_l + offs_p[None, :]
    if HAS_Z:
        z_rows = z_ptr + bi * sz_b + offs_t.to(tl.int64)[:, None] * sz_l + offs_p[None, :]
    else:
        z_rows = x_rows  # (not read)
    _finish_rows(acc0, x_rows + h0 * P, z_rows + h0 * P, D_ptr, h0, y_ptr + out_rows + h0 * P,
                 ypre_ptr + out_rows + h0 * P, mask_tp, offs_p, mask_p, P, HAS_D, D_PER_P, HAS_Z, SAVE_PRE)
    if HEADS == 2:
        _finish_rows(acc1, x_rows + h1 * P, z_rows + h1 * P, D_ptr, h1, y_ptr + out_rows + h1 * P,
                     ypre_ptr + out_rows + h1 * P, mask_tp, offs_p, mask_p, P, HAS_D, D_PER_P, HAS_Z, SAVE_PRE)


@triton.jit
def ssd_bwd_state_kernel(
    dout_ptr, x_ptr, A_ptr, C_ptr, z_ptr, ypre_ptr, seg_ptr, dtp_ptr, dlast_ptr,
    dstates_ptr, dh0_ptr, seg_final_ptr, dy_ptr, dz_ptr, dD_ptr,
    length, n_chunks, sx_b, sx_l, sC_b, sC_l, sz_b, sz_l,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DLAST: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, PER_TOKEN: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    SEGMENTS: tl.constexpr, SEGMENT_CHUNKS: tl.constexpr,
):
    # Walks the chunks of one segment backwards (SEGMENT_CHUNKS chunks; all of them when
    # SEGMENTS == 1), the last from dL/d(final state), the others from zero; with several segments
    # it stores the gradient it ends with in seg_final (b * h, segments, p, n) instead of dh0, and
    # ssd_bwd_entry_kernel / ssd_bwd_complete_kernel add what enters each segment from the later ones.
    pid_p, pid_n, pid_bhs = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_bh = pid_bhs // SEGMENTS
    segment = pid_bhs % SEGMENTS
    seg_start = segment * SEGMENT_CHUNKS * CHUNK
    seg_end = tl.minimum(seg_start + SEGMENT_CHUNKS * CHUNK, length)
    bi = (pid_bh // H).to(tl.int64)
    hi = pid_bh % H
    gi = hi // (H // G)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < P
    mask_pn = mask_p[:, None] & (offs_n[None, :] < N)
    pn_offs = offs_p[:, None] * N + offs_n[None, :]
    if not PER_TOKEN:
        A = tl.load(A_ptr + hi).to(tl.float32)
    dS = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    if HAS_DLAST:
        if segment == SEGMENTS - 1:
            dS = tl.load(dlast_ptr + (bi * H + hi) * P * N + pn_offs, mask=mask_pn, other=0.0).to(tl.float32)
    writes_dy = pid_n == 0
    dD = tl.zeros((BLOCK_P,), dtype=tl.float32)
    n_blocks = tl.cdiv(seg_end - seg_start, BLOCK_T)
    for i in range(n_blocks):
        t0 = seg_start + (n_blocks - 1 - i) * BLOCK_T
        if ((t0 + BLOCK_T) % CHUNK == 0) | (t0 + BLOCK_T >= length):
            # dS is now the gradient of the state leaving this block's chunk.
            tl.store(dstates_ptr + ((bi * n_chunks + t0 // CHUNK) * H + hi) * P * N + pn_offs,
                     dS.to(dstates_ptr.dtype.element_ty), mask=mask_pn)
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < length
        rows = bi * length + offs_t
        if PER_TOKEN:
            a = tl.load(A_ptr + rows * H + hi, mask=mask_t, other=0.0).to(tl.float32)
        else:
            a = tl.load(dtp_ptr + (bi * H + hi) * length + offs_t, mask=mask_t, other=0.0) * A
        decay_in = tl.exp(tl.cumsum(a, 0))  # from the block's start through t
        carry = tl.exp(tl.sum(a, 0))
        if HAS_SEQ:
            seg = tl.load(seg_ptr + rows, mask=mask_t, other=-1)
            seg_in = tl.load(seg_ptr + bi * length + tl.maximum(t0 - 1, 0))
            decay_in = tl.where(seg == seg_in, decay_in, 0.0)
            carry = tl.where(tl.max(seg, 0) == seg_in, carry, 0.0)
        mask_tp = mask_t[:, None] & mask_p[None, :]
        tp = (rows[:, None] * H + hi) * P + offs_p[None, :]  # dout, y_pre, dy, dz: contiguous
        dout = tl.load(dout_ptr + tp, mask=mask_tp, other=0.0).to(tl.float32)
        if HAS_Z:
            zt = tl.load(z_ptr + bi * sz_b + offs_t.to(tl.int64)[:, None] * sz_l + hi * P + offs_p[None, :], mask=mask_tp,
                         other=0.0).to(tl.float32)
            gate = tl.sigmoid(zt)
            dy = dout * zt * gate
        else:
            dy = dout
        if writes_dy:
            if HAS_Z:
                ypre = tl.load(ypre_ptr + tp, mask=mask_tp, other=0.0).to(tl.float32)
                dz = dout * ypre * gate * (1.0 + zt * (1.0 - gate))
                tl.store(dz_ptr + tp, dz.to(dz_ptr.dtype.element_ty), mask=mask_tp)
                tl.store(dy_ptr + tp, dy.to(dy_ptr.dtype.element_ty), mask=mask_tp)  # else dy is dout
            if HAS_D:
                xt = tl.load(x_ptr + bi * sx_b + offs_t.to(tl.int64)[:, None] * sx_l + hi * P + offs_p[None, :], mask=mask_tp,
                             other=0.0).to(tl.float32)
                dD += tl.sum(dy * xt, 0)
        Ct = tl.load(C_ptr + bi * sC_b + offs_t.to(tl.int64)[:, None] * sC_l + gi * N + offs_n[None, :],
                     mask=mask_t[:, None] & (offs_n[None, :] < N), other=0.0)
        dyw = (dy * decay_in[:, None]).to(Ct.dtype)
        dS = dS * carry + _dot(tl.trans(dyw), Ct, PREC)
    if SEGMENTS > 1:
        tl.store(seg_final_ptr + pid_bhs * P * N + pn_offs, dS, mask=mask_pn)
    elif HAS_H0:
        tl.store(dh0_ptr + (bi * H + hi) * P * N + pn_offs, dS, mask=mask_pn)
    if HAS_D and writes_dy:
        tl.atomic_add(dD_ptr + hi * P + offs_p, dD, mask=mask_p, sem="relaxed")


@triton.jit
def _segment_decay(cum_ptr, seg_ptr, bh, k, length, H: tl.constexpr, CHUNK: tl.constexpr,
                   SEGMENT_CHUNKS: tl.constexpr, CHUNKS_BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr):
    """What a state keeps over segment k (a full segment, all its chunks within the sequence) of
    head row bh: exp of the sum of its chunks' log-decays, 0 if a packed sequence ends within it."""
    offs_k = tl.arange(0, CHUNKS_BLOCK)
    chunks = k * SEGMENT_CHUNKS + offs_k
    decay = tl.load(cum_ptr + bh * length + (chunks + 1) * CHUNK - 1, mask=offs_k < SEGMENT_CHUNKS, other=0.0)
    carry = tl.exp(tl.sum(decay, 0))
    if HAS_SEQ:
        seq_row = seg_ptr + (bh // H) * length
        start = k * SEGMENT_CHUNKS * CHUNK
        same = tl.load(seq_row + tl.maximum(start - 1, 0)) == tl.load(seq_row + start + SEGMENT_CHUNKS * CHUNK - 1)
        carry = tl.where(same, carry, 0.0)
    return carry


@triton.jit
def ssd_bwd_entry_kernel(
    seg_final_ptr, cum_ptr, seg_ptr, entry_ptr, dh0_ptr, length,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, SEGMENTS: tl.constexpr,
    SEGMENT_CHUNKS: tl.constexpr, CHUNKS_BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_H0: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pn, bh), after a split backward walk: the gradient entering each segment but the last
    # from its end, E_k = F_{k+1} + carry_{k+1} E_{k+1} (E_{SEGMENTS-2} = F_{SEGMENTS-1}, the last
    # segment walked from dL/d(final state)), with F_k the gradient segment k's walk ended with and
    # carry_k as in ssd_fwd_entry_kernel; stores E_0 .. E_{SEGMENTS-2} (entry) and
    # dh0 = F_0 + carry_0 E_0.
    pid_pn, pid_bh = tl.program_id(0), tl.program_id(1)
    pn_offs, mask_pn = _state_tile(pid_pn, P, N, BLOCK_P, BLOCK_N)
    bh = pid_bh.to(tl.int64)
    E = tl.load(seg_final_ptr + (bh * SEGMENTS + SEGMENTS - 1) * P * N + pn_offs, mask=mask_pn, other=0.0)
    for i in range(0, SEGMENTS - 1):
        k = SEGMENTS - 2 - i
        tl.store(entry_ptr + (bh * SEGMENTS + k) * P * N + pn_offs, E, mask=mask_pn)
        F = tl.load(seg_final_ptr + (bh * SEGMENTS + k) * P * N + pn_offs, mask=mask_pn, other=0.0)
        E = F + _segment_decay(cum_ptr, seg_ptr, bh, k, length, H, CHUNK, SEGMENT_CHUNKS, CHUNKS_BLOCK, HAS_SEQ) * E
    if HAS_H0:
        tl.store(dh0_ptr + bh * P * N + pn_offs, E, mask=mask_pn)


@triton.jit
def ssd_bwd_complete_kernel(
    dstates_ptr, entry_ptr, cum_ptr, seg_ptr, length, n_chunks,
    H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, SEGMENTS: tl.constexpr,
    SEGMENT_CHUNKS: tl.constexpr, CHUNKS_BLOCK: tl.constexpr, HAS_SEQ: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Program (pn, chunk c of a segment k but the last, bh), in place: the gradient of the state
    # leaving chunk c += kept_c E_k, kept_c = exp of the log-decays of the segment's chunks after c
    # (0 if a packed sequence ends between c's last token and the segment's).
    pid_pn, c, pid_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pn_offs, mask_pn = _state_tile(pid_pn, P, N, BLOCK_P, BLOCK_N)
    bh = pid_bh.to(tl.int64)
    k = c // SEGMENT_CHUNKS
    offs_k = tl.arange(0, CHUNKS_BLOCK)
    later = (offs_k > c % SEGMENT_CHUNKS) & (offs_k < SEGMENT_CHUNKS)
    decay = tl.load(cum_ptr + bh * length + (k * SEGMENT_CHUNKS + offs_k + 1) * CHUNK - 1, mask=later, other=0.0)
    kept = tl.exp(tl.sum(decay, 0))
    if HAS_SEQ:
        seq_row = seg_ptr + (bh // H) * length
        same = tl.load(seq_row + (c + 1) * CHUNK - 1) == tl.load(seq_row + (k + 1) * SEGMENT_CHUNKS * CHUNK - 1)
        kept = tl.where(same, kept, 0.0)
    offs = (((bh // H) * n_chunks + c) * H + bh % H) * P * N + pn_offs
    dS = tl.load(dstates_ptr + offs, mask=mask_pn, other=0.0).to(tl.float32)
    E = tl.load(entry_ptr + (bh * SEGMENTS + k) * P * N + pn_offs, mask=mask_pn, other=0.0)
    tl.store(dstates_ptr + offs, (dS + kept * E).to(dstates_ptr.dtype.element_ty), mask=mask_pn)


@triton.jit
def ssd_bwd_dx_kernel(
    x_ptr, B_ptr, C_ptr, D_ptr, seg_ptr, dtp_ptr, cum_ptr, dy_ptr, dstates_ptr,
    dx_ptr, dB_ptr, ddt_direct_ptr, dcum_src_ptr, chunk_const_ptr,
    length, n_chunks, sx_b, sx_l, sB_b, sB_l, sC_b, sC_l,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, PP: tl.constexpr, NP: tl.constexpr,
    HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_SEQ: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, PREC: tl.constexpr, NARROW: tl.constexpr,
    HEADS: tl.constexpr,
):
    pid_cs, pid_bgs = tl.program_id(0), tl.program_id(1)
    split = pid_bgs % (H // G // HEADS)  # which HEADS heads of the group this program takes
    pid_bg = pid_bgs // (H // G // HEADS)
    c = pid_cs // (CHUNK // BLOCK_S)
    chunk_start = c * CHUNK
    s_start = chunk_start + (pid_cs % (CHUNK // BLOCK_S)) * BLOCK_S
    if s_start >= length:
        return
    chunk_end = tl.minimum(chunk_start + CHUNK, length)
    bi = (pid_bg // G).to(tl.int64)
    gi = pid_bg % G
    offs_s = s_start + tl.arange(0, BLOCK_S)
    mask_s = offs_s < length
    rows_s = bi * length + offs_s
    offs_p = tl.arange(0, PP)
    mask_p = offs_p < P
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_sn = mask_s[:, None] & mask_n[None, :]
    mask_sp = mask_s[:, None] & mask_p[None, :]
    Bs = tl.load(B_ptr + bi * sB_b + offs_s.to(tl.int64)[:, None] * sB_l + gi * N + offs_n[None, :], mask=mask_sn, other=0.0)
    out_ok = mask_s
    if HAS_SEQ:
        seg_s = tl.load(seg_ptr + rows_s, mask=mask_s, other=-1)
        seg_out = tl.load(seg_ptr + bi * length + chunk_end - 1)
        out_ok = out_ok & (seg_s == seg_out)
    dB = tl.zeros((BLOCK_S, NP), dtype=tl.float32)
    for j in range(HEADS):
        hi = gi * (H // G) + split * HEADS + j
        scratch = (bi * H + hi) * length
        dt_s = tl.load(dtp_ptr + scratch + offs_s, mask=mask_s, other=0.0)
        cum_s = tl.load(cum_ptr + scratch + offs_s, mask=mask_s, other=0.0)
        cum_last = tl.load(cum_ptr + scratch + chunk_end - 1)
        sp = (rows_s[:, None] * H + hi) * P + offs_p[None, :]  # dy, dx: contiguous
        xs = tl.load(x_ptr + bi * sx_b + offs_s.to(tl.int64)[:, None] * sx_l + hi * P + offs_p[None, :], mask=mask_sp, other=0.0)
        # Through the chunk's end state: dS_end (p, n) is the gradient of the state leaving the chunk.
        dS = tl.load(dstates_ptr + ((bi * n_chunks + c) * H + hi) * P * N + offs_p[:, None] * N + offs_n[None, :],
                     mask=mask_p[:, None] & mask_n[None, :], other=0.0)
        to_end = tl.where(out_ok, tl.exp(tl.where(out_ok, cum_last - cum_s, 0.0)), 0.0)
        dxw = _state_dot(Bs, tl.trans(dS), PREC, NARROW) * to_end[:, None]
        dB += _state_dot(xs, dS, PREC, NARROW) * (to_end * dt_s)[:, None]
        through_end = dt_s * tl.sum(xs.to(tl.float32) * dxw, 1)
        # Through the outputs of this chunk's later tokens.
        dcum_src = tl.zeros((BLOCK_S,), dtype=tl.float32)
        for t0 in range(s_start, chunk_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            mask_t = offs_t < length
            rows_t = bi * length + offs_t
            Ct = tl.load(C_ptr + bi * sC_b + offs_t.to(tl.int64)[:, None] * sC_l + gi * N + offs_n[None, :],
                         mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            dyt = tl.load(dy_ptr + (rows_t[:, None] * H + hi) * P + offs_p[None, :],
                          mask=mask_t[:, None] & mask_p[None, :], other=0.0)
            cum_t = tl.load(cum_ptr + scratch + offs_t, mask=mask_t, other=0.0)
            keep = (offs_t[None, :] >= offs_s[:, None]) & mask_t[None, :]
            if HAS_SEQ:
                seg_t = tl.load(seg_ptr + rows_t, mask=mask_t, other=-2)
                keep = keep & (seg_s[:, None] == seg_t[None, :])
            decay = tl.where(keep, tl.exp(tl.where(keep, cum_t[None, :] - cum_s[:, None], 0.0)), 0.0)  # [s, t]
            BC = _dot(Bs, tl.trans(Ct), PREC)
            XDY = _dot(xs, tl.trans(dyt), PREC) * decay
            dxw += _dot((BC * decay).to(dyt.dtype), dyt, PREC)
            dB += _dot((XDY * dt_s[:, None]).to(Ct.dtype), Ct, PREC)
            # (the diagonal s = t adds to dL/dcum at s and t alike and cancels: left out exactly)
            dcum_src += tl.sum(tl.where(offs_t[None, :] > offs_s[:, None], BC * XDY, 0.0), 1)
        dcum_src = dcum_src * dt_s + through_end
        dx = dxw * dt_s[:, None]
        if HAS_D:
            dys = tl.load(dy_ptr + sp, mask=mask_sp, other=0.0).to(tl.float32)
            if D_PER_P:
                dx += dys * tl.load(D_ptr + hi * P + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
            else:
                dx += dys * tl.load(D_ptr + hi).to(tl.float32)
        tl.store(dx_ptr + sp, dx.to(dx_ptr.dtype.element_ty), mask=mask_sp)
        tl.store(ddt_direct_ptr + scratch + offs_s, tl.sum(xs.to(tl.float32) * dxw, 1), mask=mask_s)
        tl.store(dcum_src_ptr + scratch + offs_s, dcum_src, mask=mask_s)
        tl.atomic_add(chunk_const_ptr + (bi * H + hi) * n_chunks + c, tl.sum(through_end, 0), sem="relaxed")
    dB_offs = (rows_s[:, None] * G + gi) * N + offs_n[None, :]
    if HEADS == H // G:
        tl.store(dB_ptr + dB_offs, dB.to(dB_ptr.dtype.element_ty), mask=mask_sn)
    else:  # the group's heads are split over programs: sum into a zeroed float32 dB
        tl.atomic_add(dB_ptr + dB_offs, dB, mask=mask_sn, sem="relaxed")


@triton.jit
def ssd_bwd_dc_kernel(
    x_ptr, B_ptr, C_ptr, seg_ptr, dtp_ptr, cum_ptr, dy_ptr, states_ptr, dstates_ptr,
    dC_ptr, dcum_dst_ptr, chunk_const_ptr,
    length, n_chunks, sx_b, sx_l, sB_b, sB_l, sC_b, sC_l,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, PP: tl.constexpr, NP: tl.constexpr,
    HAS_SEQ: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, PREC: tl.constexpr,
    NARROW: tl.constexpr, HEADS: tl.constexpr,
):
    pid_ct, pid_bgs = tl.program_id(0), tl.program_id(1)
    split = pid_bgs % (H // G // HEADS)  # which HEADS heads of the group this program takes
    pid_bg = pid_bgs // (H // G // HEADS)
    c = pid_ct // (CHUNK // BLOCK_T)
    chunk_start = c * CHUNK
    first_block = pid_ct % (CHUNK // BLOCK_T) == 0
    t_start = chunk_start + (pid_ct % (CHUNK // BLOCK_T)) * BLOCK_T
    if t_start >= length:
        return
    chunk_end = tl.minimum(chunk_start + CHUNK, length)
    bi = (pid_bg // G).to(tl.int64)
    gi = pid_bg % G
    offs_t = t_start + tl.arange(0, BLOCK_T)
    mask_t = offs_t < length
    rows_t = bi * length + offs_t
    offs_p = tl.arange(0, PP)
    mask_p = offs_p < P
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    mask_tn = mask_t[:, None] & mask_n[None, :]
    mask_pn = mask_p[:, None] & mask_n[None, :]
    Ct = tl.load(C_ptr + bi * sC_b + offs_t.to(tl.int64)[:, None] * sC_l + gi * N + offs_n[None, :], mask=mask_tn, other=0.0)
    in_ok = mask_t
    carry_ok = True
    if HAS_SEQ:
        seg_t = tl.load(seg_ptr + rows_t, mask=mask_t, other=-1)
        seg_in = tl.load(seg_ptr + bi * length + tl.maximum(chunk_start - 1, 0))
        in_ok = in_ok & (seg_t == seg_in)
        carry_ok = tl.load(seg_ptr + bi * length + chunk_end - 1) == seg_in
    dC = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for j in range(HEADS):
        hi = gi * (H // G) + split * HEADS + j
        scratch = (bi * H + hi) * length
        cum_t = tl.load(cum_ptr + scratch + offs_t, mask=mask_t, other=0.0)
        dyt = tl.load(dy_ptr + (rows_t[:, None] * H + hi) * P + offs_p[None, :],
                      mask=mask_t[:, None] & mask_p[None, :], other=0.0)
        state_offs = ((bi * n_chunks + c) * H + hi) * P * N + offs_p[:, None] * N + offs_n[None, :]
        S = tl.load(states_ptr + state_offs, mask=mask_pn, other=0.0)
        # Through the state entering the chunk.
        decay_in = tl.where(in_ok, tl.exp(tl.where(in_ok, cum_t, 0.0)), 0.0)
        dC_in = _state_dot(dyt, S, PREC, NARROW) * decay_in[:, None]
        dcum_dst = tl.sum(Ct.to(tl.float32) * dC_in, 1)
        dC += dC_in
        for s0 in range(chunk_start, tl.minimum(t_start + BLOCK_T, length), BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask_s = offs_s < length
            rows_s = bi * length + offs_s
            Bs = tl.load(B_ptr + bi * sB_b + offs_s.to(tl.int64)[:, None] * sB_l + gi * N + offs_n[None, :],
                         mask=mask_s[:, None] & mask_n[None, :], other=0.0)
            xs = tl.load(x_ptr + bi * sx_b + offs_s.to(tl.int64)[:, None] * sx_l + hi * P + offs_p[None, :],
                         mask=mask_s[:, None] & mask_p[None, :], other=0.0)
            cum_s = tl.load(cum_ptr + scratch + offs_s, mask=mask_s, other=0.0)
            dt_s = tl.load(dtp_ptr + scratch + offs_s, mask=mask_s, other=0.0)
            keep = (offs_s[None, :] <= offs_t[:, None]) & mask_s[None, :]
            if HAS_SEQ:
                seg_s = tl.load(seg_ptr + rows_s, mask=mask_s, other=-2)
                keep = keep & (seg_t[:, None] == seg_s[None, :])
            mix = tl.where(keep, tl.exp(tl.where(keep, cum_t[:, None] - cum_s[None, :], 0.0)), 0.0) * dt_s[None, :]
            DYX = _dot(dyt, tl.trans(xs), PREC) * mix
            CB = _dot(Ct, tl.trans(Bs), PREC)
            dC += _dot(DYX.to(Bs.dtype), Bs, PREC)
            dcum_dst += tl.sum(tl.where(offs_s[None, :] < offs_t[:, None], DYX * CB, 0.0), 1)
        tl.store(dcum_dst_ptr + scratch + offs_t, dcum_dst, mask=mask_t)
        if first_block & carry_ok:
            # d/dcum_last of <dS_end, exp(cum_last) S_in>: the decay carried across the whole chunk.
            dS = tl.load(dstates_ptr + state_offs, mask=mask_pn, other=0.0)
            cum_last = tl.load(cum_ptr + scratch + chunk_end - 1)
            tl.atomic_add(chunk_const_ptr + (bi * H + hi) * n_chunks + c, tl.exp(cum_last) * tl.sum(tl.sum(dS.to(tl.float32) * S.to(tl.float32), 1), 0), sem="relaxed")
    dC_offs = (rows_t[:, None] * G + gi) * N + offs_n[None, :]
    if HEADS == H // G:
        tl.store(dC_ptr + dC_offs, dC.to(dC_ptr.dtype.element_ty), mask=mask_tn)
    else:  # the group's heads are split over programs: sum into a zeroed float32 dC
        tl.atomic_add(dC_ptr + dC_offs, dC, mask=mask_tn, sem="relaxed")


@triton.jit
def ssd_bwd_dt_kernel(
    dt_ptr, A_ptr, bias_ptr, dtp_ptr, ddt_direct_ptr, dcum_src_ptr, dcum_dst_ptr, chunk_const_ptr,
    ddt_ptr, dA_ptr, dbias_ptr,
    length, n_chunks, dt_lo, dt_hi, sdt_b, sdt_l,
    H: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, PER_TOKEN: tl.constexpr,
    CHUNK: tl.constexpr,
):
    c, pid_bh = tl.program_id(0), tl.program_id(1)
    bi = (pid_bh // H).to(tl.int64)
    hi = pid_bh % H
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < length
    scratch = (bi * H + hi) * length + offs
    dcum = tl.load(dcum_dst_ptr + scratch, mask=mask, other=0.0) - tl.load(dcum_src_ptr + scratch, mask=mask, other=0.0)
    # da_r = sum over t >= r in the chunk of dL/dcum_t, plus what the chunk's last token collects.
    da = tl.cumsum(dcum, 0, reverse=True) + tl.load(chunk_const_ptr + (bi * H + hi) * n_chunks + c)
    da = tl.where(mask, da, 0.0)
    if PER_TOKEN:  # da is the gradient of each token's log-decay; dt is the input weight itself
        tl.store(dA_ptr + (bi * length + offs) * H + hi, da, mask=mask)
        ddt = tl.load(ddt_direct_ptr + scratch, mask=mask, other=0.0)
    else:
        A = tl.load(A_ptr + hi).to(tl.float32)
        dt = tl.load(dtp_ptr + scratch, mask=mask, other=0.0)
        ddt = tl.load(ddt_direct_ptr + scratch, mask=mask, other=0.0) + A * da
        tl.atomic_add(dA_ptr + hi, tl.sum(dt * da, 0), sem="relaxed")
    v = tl.load(dt_ptr + bi * sdt_b + offs.to(tl.int64) * sdt_l + hi, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + hi).to(tl.float32)
    if CLAMP:
        sp = v
        if SOFTPLUS:
            sp = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
        ddt = tl.where((sp >= dt_lo) & (sp <= dt_hi), ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(v > 20.0, ddt, ddt * tl.sigmoid(v))
    ddt = tl.where(mask, ddt, 0.0)
    tl.store(ddt_ptr + (bi * length + offs) * H + hi, ddt.to(ddt_ptr.dtype.element_ty), mask=mask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + hi, tl.sum(ddt, 0), sem="relaxed")
