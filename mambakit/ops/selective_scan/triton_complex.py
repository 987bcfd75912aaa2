"""Triton kernels of the Mamba-1 selective scan with a complex diagonal A, forward and backward.

The same tiling as the real kernels (``triton_kernels``): one program per (batch row, block of
channels) walks tiles of BLOCK_L tokens and, per state entry, scans the tile along time; here the
state, the decay a = exp(Delta A) and the drive Delta B u are complex, held as (re, im) pairs of
fp32 tiles, and y takes 2 Re(<C_t, h_t>) (the state stands for a conjugate pair).

Memory forms (all fp32 views prepared by the launcher): A, time-invariant B/C, the initial and
final states and the saved chunk states are complex tensors viewed as real with a trailing
(re, im) axis; variable and grouped B/C are real tensors with re/im interleaved along time,
element 2t = Re, 2t + 1 = Im.

Gradients follow PyTorch's convention for complex tensors (dL/dRe + i dL/dIm): through a product
w = p q the gradient of q is conj(p) times that of w, so the adjoint runs backwards with the
conjugate decay.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import (LOG2E, _backward_tile_inputs, _backward_tile_outputs, _column, _delta,
                             _forward_tile_inputs, _next_decay_inputs, _set_column)


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
    """Complex affine maps h -> a h + b: apply the first, then the second."""
    ar, ai = _cmul(ar1, ai1, ar2, ai2)
    cr, ci = _cmul(ar2, ai2, br1, bi1)
    return ar, ai, cr + br2, ci + bi2


@triton.jit
def _decay(delta, p_A, o_d, m_d, i_n: tl.constexpr, N: tl.constexpr):
    """a = exp(Delta A_n) as (re, im) tiles, and A_n (natural units) as (re, im) columns."""
    A_re = tl.load(p_A + (o_d * N + i_n) * 2, mask=m_d, other=0.0)
    A_im = tl.load(p_A + (o_d * N + i_n) * 2 + 1, mask=m_d, other=0.0)
    magnitude = tl.exp2(delta * (A_re * LOG2E)[:, None])
    angle = delta * A_im[:, None]
    return magnitude * tl.cos(angle), magnitude * tl.sin(angle), A_re, A_im


@triton.jit
def _projection(p_X, i_b, i_n: tl.constexpr, o_d, o_t, m_d, m_t, dim, length, per_group, N: tl.constexpr,
                VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """Entry i_n of a complex B or C as (re, im): (BLOCK_D, 1) time-invariant, (1, BLOCK_L) variable,
    (BLOCK_D, BLOCK_L) grouped."""
    if not VARIABLE:
        o = (o_d * N + i_n) * 2
        re = tl.load(p_X + o, mask=m_d, other=0.0)[:, None]
        im = tl.load(p_X + o + 1, mask=m_d, other=0.0)[:, None]
    elif GROUPED:
        row = ((i_b * (dim // per_group) + o_d // per_group) * N + i_n).to(tl.int64) * (2 * length)
        o = row[:, None] + 2 * o_t[None, :]
        m = m_d[:, None] & m_t[None, :]
        re = tl.load(p_X + o, mask=m, other=0.0)
        im = tl.load(p_X + o + 1, mask=m, other=0.0)
    else:
        o = (i_b * N + i_n).to(tl.int64) * (2 * length) + 2 * o_t
        re = tl.load(p_X + o, mask=m_t, other=0.0)[None, :]
        im = tl.load(p_X + o + 1, mask=m_t, other=0.0)[None, :]
    return re, im


@triton.jit
def _add_projection_grad(p_dX, g_re, g_im, i_b, i_n: tl.constexpr, o_d, o_t, m_d, m_t, dim, length, per_group,
                         N: tl.constexpr, GROUPED: tl.constexpr):
    """Add a per-channel (re, im) gradient of a variable/grouped B or C into its interleaved fp32
    buffer, summing the block's channels first when they share one row."""
    if GROUPED:
        row = ((i_b * (dim // per_group) + o_d // per_group) * N + i_n).to(tl.int64) * (2 * length)
        o = row[:, None] + 2 * o_t[None, :]
        m = m_d[:, None] & m_t[None, :]
        tl.atomic_add(p_dX + o, g_re, mask=m, sem="relaxed")
        tl.atomic_add(p_dX + o + 1, g_im, mask=m, sem="relaxed")
    else:
        o = (i_b * N + i_n).to(tl.int64) * (2 * length) + 2 * o_t[None, :]
        tl.atomic_add(p_dX + o, tl.sum(g_re, axis=0)[None, :], mask=m_t[None, :], sem="relaxed")
        tl.atomic_add(p_dX + o + 1, tl.sum(g_im, axis=0)[None, :], mask=m_t[None, :], sem="relaxed")


@triton.jit
def _load_state(p_X, o_state, m_dn):
    """(re, im) of a complex (..., n) state stored as (..., n, 2) fp32."""
    return (tl.load(p_X + o_state * 2, mask=m_dn, other=0.0).to(tl.float32),
            tl.load(p_X + o_state * 2 + 1, mask=m_dn, other=0.0).to(tl.float32))


@triton.jit
def selective_scan_complex_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq,
    p_y, p_ypre, p_last, p_states,
    dim, length, b_per_group, c_per_group, n_saved,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_STATES: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, SAVE_EVERY: tl.constexpr,
):
    """y (b, d, l), the final state (b, d, n, 2) and, if SAVE_STATES, the state at the end of
    each SAVE_EVERY-token chunk (b, d, n_saved, n, 2) and the output before the z gate."""
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else None
    D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32) if HAS_D else None
    o_state = (i_b * dim + o_d[:, None]).to(tl.int64) * N + o_n[None, :]
    if HAS_H0:
        h_re, h_im = _load_state(p_h0, o_state, m_dn)
    else:
        h_re = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
        h_im = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    row = (i_b * dim + o_d).to(tl.int64) * length
    for t0 in range(0, length, BLOCK_L):
        o_t = t0 + o_l
        m_t = o_t < length
        offs, m, u, delta, drive, reset = _forward_tile_inputs(p_u, p_delta, p_seq, bias, row, m_d, o_t, i_b, length,
                                                               1, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for i_n in tl.static_range(N):
            a_re, a_im, _, _ = _decay(delta, p_A, o_d, m_d, i_n, N)
            if HAS_SEQ:
                a_re = tl.where(reset[None, :], 0.0, a_re)
                a_im = tl.where(reset[None, :], 0.0, a_im)
            B_re, B_im = _projection(p_B, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, b_per_group, N,
                                     B_VARIABLE, B_GROUPED)
            b_re = drive * B_re
            b_im = drive * B_im
            # Enter the carried state through the first token: b_0 += a_0 h.
            carried_re, carried_im = _cmul(a_re, a_im, _column(h_re, o_n, i_n)[:, None], _column(h_im, o_n, i_n)[:, None])
            first = o_l[None, :] == 0
            b_re = tl.where(first, b_re + carried_re, b_re)
            b_im = tl.where(first, b_im + carried_im, b_im)
            _, _, hs_re, hs_im = tl.associative_scan((a_re, a_im, b_re, b_im), axis=1, combine_fn=_combine_complex)
            C_re, C_im = _projection(p_C, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, c_per_group, N,
                                     C_VARIABLE, C_GROUPED)
            y += 2.0 * (C_re * hs_re - C_im * hs_im)
            h_re = _set_column(h_re, o_n, i_n, _column(hs_re, o_l, BLOCK_L - 1))
            h_im = _set_column(h_im, o_n, i_n, _column(hs_im, o_l, BLOCK_L - 1))
        if SAVE_STATES:
            if ((t0 + BLOCK_L) % SAVE_EVERY == 0) | (t0 + BLOCK_L >= length):
                o_chunk = (((i_b * dim + o_d[:, None]).to(tl.int64) * n_saved + t0 // SAVE_EVERY) * N + o_n[None, :]) * 2
                tl.store(p_states + o_chunk, h_re, mask=m_dn)
                tl.store(p_states + o_chunk + 1, h_im, mask=m_dn)
        if HAS_D:
            y += D[:, None] * u
        if HAS_Z:
            if SAVE_STATES:
                tl.store(p_ypre + offs, y.to(p_ypre.dtype.element_ty), mask=m)
            zv = tl.load(p_z + offs, mask=m, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(p_y + offs, y.to(p_y.dtype.element_ty), mask=m)
    tl.store(p_last + o_state * 2, h_re, mask=m_dn)
    tl.store(p_last + o_state * 2 + 1, h_im, mask=m_dn)


@triton.jit
def selective_scan_complex_bwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq, p_states, p_ypre, p_dy, p_dlast,
    p_du, p_ddelta, p_dA, p_dB, p_dC, p_dD, p_dz, p_dbias, p_dh0,
    dim, length, b_per_group, c_per_group, n_saved,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DLAST: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Gradients of the complex scan, one SAVE_EVERY chunk per tile, walking backwards.

    With g_t the adjoint of h_t, a_t = exp(Delta_t A), b_t = Delta_t u_t B_t, m_t = a_t h_{t-1}
    = h_t - b_t and Re<p, q> = Re(conj(p) q):
        g_t = 2 dy_t conj(C_t) + conj(a_{t+1}) g_{t+1}
        dDelta_t += Re<u_t B_t, g_t> + Re<A m_t, g_t>,   du_t += Delta_t Re<B_t, g_t>,
        dA += Delta_t conj(m_t) g_t,   dB_t += Delta_t u_t g_t,   dC_t += 2 dy_t conj(h_t),
        dh_{-1} = conj(a_0) g_0.
    """
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else None
    o_state = (i_b * dim + o_d[:, None]).to(tl.int64) * N + o_n[None, :]
    if HAS_DLAST:
        g_re, g_im = _load_state(p_dlast, o_state, m_dn)  # the adjoint of the state after the tile
    else:
        g_re = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
        g_im = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dA_re = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dA_im = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dB_re = tl.zeros((BLOCK_D, NP), dtype=tl.float32)  # time-invariant B only
    dB_im = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dC_re = tl.zeros((BLOCK_D, NP), dtype=tl.float32)  # time-invariant C only
    dC_im = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row = (i_b * dim + o_d).to(tl.int64) * length
    o_chunks = (i_b * dim + o_d).to(tl.int64) * n_saved * N
    n_tiles = tl.cdiv(length, BLOCK_L)
    first = o_l[None, :] == 0
    for i_rev in range(0, n_tiles):
        i_t = n_tiles - 1 - i_rev
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < length
        offs, m, u, delta, delta_raw, drive, reset, dy = _backward_tile_inputs(
            p_u, p_delta, p_z, p_ypre, p_dy, p_dz, p_seq, bias, row, row, row, m_d, o_t, i_b, length, 1, 1, 1,
            HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        # The adjoint's inputs in descending time (see the real kernel): its reverse scan is a
        # forward scan, and only its result is flipped back.
        o_rev = i_t * BLOCK_L + BLOCK_L - 1 - o_l
        delta_next, reset_next = _next_decay_inputs(p_delta, p_seq, bias, row, m_d, o_t, o_rev, i_b, length, 1,
                                                    HAS_BIAS, SOFTPLUS, HAS_SEQ)
        dy_rev = tl.flip(dy, 1)
        ddelta = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        du = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for i_n in tl.static_range(N):
            if i_t > 0:
                o_start = (o_chunks + (i_t - 1) * N + i_n) * 2
                h_re = tl.load(p_states + o_start, mask=m_d, other=0.0)
                h_im = tl.load(p_states + o_start + 1, mask=m_d, other=0.0)
            elif HAS_H0:
                o_start = ((i_b * dim + o_d).to(tl.int64) * N + i_n) * 2
                h_re = tl.load(p_h0 + o_start, mask=m_d, other=0.0).to(tl.float32)
                h_im = tl.load(p_h0 + o_start + 1, mask=m_d, other=0.0).to(tl.float32)
            else:
                h_re = tl.zeros((BLOCK_D,), dtype=tl.float32)
                h_im = tl.zeros((BLOCK_D,), dtype=tl.float32)
            a_re, a_im, A_re, A_im = _decay(delta, p_A, o_d, m_d, i_n, N)
            an_re, an_im, _, _ = _decay(delta_next, p_A, o_d, m_d, i_n, N)
            if HAS_SEQ:
                a_re = tl.where(reset[None, :], 0.0, a_re)
                a_im = tl.where(reset[None, :], 0.0, a_im)
                an_re = tl.where(reset_next[None, :], 0.0, an_re)
                an_im = tl.where(reset_next[None, :], 0.0, an_im)
            B_re, B_im = _projection(p_B, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, b_per_group, N,
                                     B_VARIABLE, B_GROUPED)
            if C_GROUPED:  # descending time (see _next_decay_inputs)
                C_re, C_im = _projection(p_C, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, c_per_group, N,
                                         C_VARIABLE, C_GROUPED)
                C_re = tl.flip(C_re, 1)
                C_im = tl.flip(C_im, 1)
            else:
                C_re, C_im = _projection(p_C, i_b, i_n, o_d, o_rev, m_d, o_rev < length, dim, length, c_per_group, N,
                                         C_VARIABLE, C_GROUPED)
            # Recompute the states from the chunk's start state.
            b_re = drive * B_re
            b_im = drive * B_im
            carried_re, carried_im = _cmul(a_re, a_im, h_re[:, None], h_im[:, None])
            _, _, hs_re, hs_im = tl.associative_scan(
                (a_re, a_im, tl.where(first, b_re + carried_re, b_re), tl.where(first, b_im + carried_im, b_im)),
                axis=1, combine_fn=_combine_complex)
            # Adjoint: reverse scan with the conjugate decay of the next token, in descending time;
            # the adjoint after the tile enters through its last token, the first in that order.
            c_re = 2.0 * dy_rev * C_re
            c_im = -2.0 * dy_rev * C_im
            after_re, after_im = _cmul(an_re, -an_im, _column(g_re, o_n, i_n)[:, None], _column(g_im, o_n, i_n)[:, None])
            _, _, gt_re, gt_im = tl.associative_scan(
                (an_re, -an_im, tl.where(first, c_re + after_re, c_re), tl.where(first, c_im + after_im, c_im)),
                axis=1, combine_fn=_combine_complex)
            g_re = _set_column(g_re, o_n, i_n, _column(gt_re, o_l, BLOCK_L - 1))
            g_im = _set_column(g_im, o_n, i_n, _column(gt_im, o_l, BLOCK_L - 1))
            gt_re = tl.flip(gt_re, 1)
            gt_im = tl.flip(gt_im, 1)

            mt_re = hs_re - b_re  # a_t h_{t-1}
            mt_im = hs_im - b_im
            Am_re, Am_im = _cmul(A_re[:, None], A_im[:, None], mt_re, mt_im)
            gB = B_re * gt_re + B_im * gt_im  # Re<B, g>
            ddelta += u * gB + Am_re * gt_re + Am_im * gt_im
            du += gB
            # conj(m) g
            dA_re = _set_column(dA_re, o_n, i_n, _column(dA_re, o_n, i_n) + tl.sum(delta * (mt_re * gt_re + mt_im * gt_im), axis=1))
            dA_im = _set_column(dA_im, o_n, i_n, _column(dA_im, o_n, i_n) + tl.sum(delta * (mt_re * gt_im - mt_im * gt_re), axis=1))
            if B_VARIABLE:
                _add_projection_grad(p_dB, drive * gt_re, drive * gt_im, i_b, i_n, o_d, o_t, m_d, m_t, dim, length,
                                     b_per_group, N, B_GROUPED)
            else:
                dB_re = _set_column(dB_re, o_n, i_n, _column(dB_re, o_n, i_n) + tl.sum(drive * gt_re, axis=1))
                dB_im = _set_column(dB_im, o_n, i_n, _column(dB_im, o_n, i_n) + tl.sum(drive * gt_im, axis=1))
            if C_VARIABLE:
                _add_projection_grad(p_dC, 2.0 * dy * hs_re, -2.0 * dy * hs_im, i_b, i_n, o_d, o_t, m_d, m_t, dim,
                                     length, c_per_group, N, C_GROUPED)
            else:
                dC_re = _set_column(dC_re, o_n, i_n, _column(dC_re, o_n, i_n) + tl.sum(2.0 * dy * hs_re, axis=1))
                dC_im = _set_column(dC_im, o_n, i_n, _column(dC_im, o_n, i_n) - tl.sum(2.0 * dy * hs_im, axis=1))
        dD_acc, dbias_acc = _backward_tile_outputs(p_D, p_du, p_ddelta, du, ddelta, u, delta, delta_raw, dy, offs, m,
                                                   o_d, m_d, dD_acc, dbias_acc, HAS_D, HAS_BIAS, SOFTPLUS)

    if HAS_H0:
        # dL/dh_{-1} = conj(a_0) g_0 (the first token never starts a new sequence).
        delta0, _ = _delta(p_delta, row[:, None], m_d[:, None], bias, HAS_BIAS, SOFTPLUS)
        o_A = (o_d[:, None] * N + o_n[None, :]) * 2
        A_re = tl.load(p_A + o_A, mask=m_dn, other=0.0)
        A_im = tl.load(p_A + o_A + 1, mask=m_dn, other=0.0)
        magnitude = tl.exp2(delta0 * A_re * LOG2E)
        angle = delta0 * A_im
        dh_re, dh_im = _cmul(magnitude * tl.cos(angle), -magnitude * tl.sin(angle), g_re, g_im)
        tl.store(p_dh0 + o_state * 2, dh_re, mask=m_dn)
        tl.store(p_dh0 + o_state * 2 + 1, dh_im, mask=m_dn)
    o_param = (o_d[:, None] * N + o_n[None, :]) * 2
    tl.atomic_add(p_dA + o_param, dA_re, mask=m_dn, sem="relaxed")
    tl.atomic_add(p_dA + o_param + 1, dA_im, mask=m_dn, sem="relaxed")
    if not B_VARIABLE:
        tl.atomic_add(p_dB + o_param, dB_re, mask=m_dn, sem="relaxed")
        tl.atomic_add(p_dB + o_param + 1, dB_im, mask=m_dn, sem="relaxed")
    if not C_VARIABLE:
        tl.atomic_add(p_dC + o_param, dC_re, mask=m_dn, sem="relaxed")
        tl.atomic_add(p_dC + o_param + 1, dC_im, mask=m_dn, sem="relaxed")
    if HAS_D:
        tl.atomic_add(p_dD + o_d, dD_acc, mask=m_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, dbias_acc, mask=m_d, sem="relaxed")
