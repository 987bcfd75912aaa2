"""Triton kernels of the Mamba-1 selective scan (real A), forward and backward.

Layout: one program per (batch row, block of BLOCK_D channels). It walks the sequence in tiles of
BLOCK_L tokens; inside a tile the recurrence h_t = a_t h_{t-1} + b_t over the (BLOCK_D, N) state
runs as a parallel associative scan along time, and the tile's last state carries into the next
tile. The (b, d, l, n) state never touches memory: the forward keeps only each tile's final state
(b, d, n_tiles, n) when a backward will need it, and the backward walks the tiles in reverse,
recomputing the tile's states from the stored start state, then the adjoint by a reverse scan.

Why exp2: the hardware exponential is base 2; A is pre-scaled by log2(e) once per program.
Why fp32: every decay, state and reduction is float32 whatever the input dtype.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def _configs():
    # BLOCK_L is fixed by the launcher (the backward must use the forward's tiles); the channel
    # block and warps trade registers ((BLOCK_D, N, BLOCK_L) tiles) against parallelism. The
    # interpreter (CI on CPU) has nothing to tune and no device to time: one config.
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_D": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_D": bd}, num_warps=w)
        for bd in (2, 4, 8)
        for w in (2, 4)
    ]


@triton.jit
def _combine(a_first, b_first, a_second, b_second):
    """Affine maps h -> a h + b: apply ``first`` then ``second``."""
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _softplus(x):
    # log(1 + e^x) with the usual switch to the identity above 20 (as torch's threshold).
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _load_projection(p_X, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, channels_per_group,
                     VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """B or C as a (BLOCK_D | 1, N, BLOCK_L) tile in fp32.

    Time-invariant (d, n): (BLOCK_D, N, 1). Variable (b, g, n, l): (1, N, BLOCK_L) when every
    channel of the block reads one row (g == 1), else gathered per channel (BLOCK_D, N, BLOCK_L).
    """
    if not VARIABLE:
        offs = o_d[:, None] * n + o_n[None, :]
        X = tl.load(p_X + offs, mask=m_d[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        return X[:, :, None]
    if GROUPED:
        groups = dim // channels_per_group
        o_g = o_d // channels_per_group
        offs = ((i_b * groups + o_g[:, None, None]) * n + o_n[None, :, None]) * length + o_t[None, None, :]
        m = m_d[:, None, None] & m_n[None, :, None] & m_t[None, None, :]
        return tl.load(p_X + offs, mask=m, other=0.0).to(tl.float32)
    offs = (i_b * n + o_n[:, None]) * length + o_t[None, :]
    X = tl.load(p_X + offs, mask=m_n[:, None] & m_t[None, :], other=0.0).to(tl.float32)
    return X[None, :, :]


@triton.jit
def _delta(p_delta, p_bias, offs, o_d, m, m_d, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Delta tile (BLOCK_D, BLOCK_L) in fp32 and the pre-softplus value (for its derivative)."""
    raw = tl.load(p_delta + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        return _softplus(raw), raw
    return raw, raw


@triton.jit
def _resets(p_seq, i_b, o_t, m_t, length, HAS_SEQ: tl.constexpr):
    """(BLOCK_L,) True where a new packed sequence starts (seq_idx changes), never at t = 0."""
    if HAS_SEQ:
        here = tl.load(p_seq + i_b * length + o_t, mask=m_t, other=0)
        before = tl.load(p_seq + i_b * length + o_t - 1, mask=m_t & (o_t > 0), other=0)
        return (here != before) & (o_t > 0)
    return o_t < 0


@triton.autotune(configs=_configs(), key=["N", "HAS_Z", "B_VARIABLE", "C_VARIABLE", "B_GROUPED", "C_GROUPED", "SAVE_STATES"])
@triton.jit
def selective_scan_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq,
    p_y, p_last, p_states,
    dim, length, n, b_per_group, c_per_group,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_STATES: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, N)
    m_d, m_n = o_d < dim, o_n < n
    m_dn = m_d[:, None] & m_n[None, :]
    A2 = tl.load(p_A + o_d[:, None] * n + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32) * 1.4426950408889634
    o_state = (i_b * dim + o_d[:, None]) * n + o_n[None, :]  # (BLOCK_D, N) into (b, d, n)
    if HAS_H0:
        h = tl.load(p_h0 + o_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    n_tiles = tl.cdiv(length, BLOCK_L)
    for i_t in range(0, n_tiles):
        o_t = i_t * BLOCK_L + tl.arange(0, BLOCK_L)
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        offs = (i_b * dim + o_d[:, None]) * length + o_t[None, :]  # (BLOCK_D, BLOCK_L) into (b, d, l)
        u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
        delta, _ = _delta(p_delta, p_bias, offs, o_d, m, m_d, HAS_BIAS, SOFTPLUS)
        Bt = _load_projection(p_B, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, b_per_group, B_VARIABLE, B_GROUPED)
        Ct = _load_projection(p_C, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, c_per_group, C_VARIABLE, C_GROUPED)
        # [BD, 1, BL] * [BD, N, 1] -> [BD, N, BL]
        a = tl.exp2(delta[:, None, :] * A2[:, :, None])
        b = (delta * u)[:, None, :] * Bt
        reset = _resets(p_seq, i_b, o_t, m_t, length, HAS_SEQ)
        # Padding tokens are the identity map; a new packed sequence forgets the state.
        a = tl.where(m_t[None, None, :], tl.where(reset[None, None, :], 0.0, a), 1.0)
        b = tl.where(m_t[None, None, :], b, 0.0)
        a_scan, b_scan = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
        hs = a_scan * h[:, :, None] + b_scan  # [BD, N, BL]
        y = tl.sum(hs * Ct, axis=1)  # [BD, BL]
        h = tl.sum(tl.where((tl.arange(0, BLOCK_L) == BLOCK_L - 1)[None, None, :], hs, 0.0), axis=2)
        if SAVE_STATES:
            tl.store(p_states + ((i_b * dim + o_d[:, None]) * n_tiles + i_t) * n + o_n[None, :], h, mask=m_dn)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zv = tl.load(p_z + offs, mask=m, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(p_y + offs, y.to(p_y.dtype.element_ty), mask=m)
    tl.store(p_last + o_state, h, mask=m_dn)


@triton.autotune(configs=_configs(), key=["N", "HAS_Z", "B_VARIABLE", "C_VARIABLE", "B_GROUPED", "C_GROUPED"],
                 reset_to_zero=["p_dA", "p_dB", "p_dC", "p_dD", "p_dbias"])
@triton.jit
def selective_scan_bwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq, p_states, p_dy, p_dlast,
    p_du, p_ddelta, p_dA, p_dB, p_dC, p_dD, p_dz, p_dbias, p_dh0,
    dim, length, n, b_per_group, c_per_group,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DLAST: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, N)
    m_d, m_n = o_d < dim, o_n < n
    m_dn = m_d[:, None] & m_n[None, :]
    A_nat = tl.load(p_A + o_d[:, None] * n + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    A2 = A_nat * 1.4426950408889634
    o_state = (i_b * dim + o_d[:, None]) * n + o_n[None, :]
    # g_carry: total gradient of the state just after the current tile (the final state's own
    # gradient at the end of the sequence).
    if HAS_DLAST:
        g_carry = tl.load(p_dlast + o_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        g_carry = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dB_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)  # time-invariant B only
    dC_acc = tl.zeros((BLOCK_D, N), dtype=tl.float32)  # time-invariant C only
    n_tiles = tl.cdiv(length, BLOCK_L)
    o_l = tl.arange(0, BLOCK_L)
    for i_rev in range(0, n_tiles):
        i_t = n_tiles - 1 - i_rev
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        offs = (i_b * dim + o_d[:, None]) * length + o_t[None, :]
        if i_t > 0:
            h_start = tl.load(p_states + ((i_b * dim + o_d[:, None]) * n_tiles + i_t - 1) * n + o_n[None, :], mask=m_dn, other=0.0)
        elif HAS_H0:
            h_start = tl.load(p_h0 + o_state, mask=m_dn, other=0.0).to(tl.float32)
        else:
            h_start = tl.zeros((BLOCK_D, N), dtype=tl.float32)
        u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
        delta, delta_raw = _delta(p_delta, p_bias, offs, o_d, m, m_d, HAS_BIAS, SOFTPLUS)
        Bt = _load_projection(p_B, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, b_per_group, B_VARIABLE, B_GROUPED)
        Ct = _load_projection(p_C, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, c_per_group, C_VARIABLE, C_GROUPED)
        a = tl.exp2(delta[:, None, :] * A2[:, :, None])
        b = (delta * u)[:, None, :] * Bt
        reset = _resets(p_seq, i_b, o_t, m_t, length, HAS_SEQ)
        a = tl.where(m_t[None, None, :], tl.where(reset[None, None, :], 0.0, a), 1.0)
        b = tl.where(m_t[None, None, :], b, 0.0)
        a_scan, b_scan = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
        hs = a_scan * h_start[:, :, None] + b_scan  # recomputed states [BD, N, BL]

        dout = tl.load(p_dy + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += Dv[:, None] * u
            zv = tl.load(p_z + offs, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            dy = dout * zv * sig
            dz = dout * y * sig * (1.0 + zv * (1.0 - sig))
            tl.store(p_dz + offs, dz.to(p_dz.dtype.element_ty), mask=m)
        else:
            dy = dout
        # Decay into the next token (a_{t+1}); 1 after the last token so the final state's
        # gradient enters there; 0 where the next token starts a new packed sequence.
        o_next = o_t + 1
        m_next = m_d[:, None] & (o_next < length)[None, :]
        delta_next, _ = _delta(p_delta, p_bias, offs + 1, o_d, m_next, m_d, HAS_BIAS, SOFTPLUS)
        a_next = tl.exp2(delta_next[:, None, :] * A2[:, :, None])
        reset_next = _resets(p_seq, i_b, o_next, o_next < length, length, HAS_SEQ)
        a_next = tl.where(reset_next[None, None, :], 0.0, a_next)
        a_next = tl.where((o_next < length)[None, None, :], a_next, 1.0)
        beta = Ct * dy[:, None, :]
        beta = tl.where(m_t[None, None, :], beta, 0.0)
        ga, gb = tl.associative_scan((a_next, beta), axis=2, combine_fn=_combine, reverse=True)
        g = gb + ga * g_carry[:, :, None]  # dL/dh_t, [BD, N, BL]
        g_carry = tl.sum(tl.where((o_l == 0)[None, None, :], g, 0.0), axis=2)

        d_logdecay = g * (hs - b)  # dL/d(Delta A) = g_t a_t h_{t-1}
        d_logdecay = tl.where(m_t[None, None, :], d_logdecay, 0.0)
        g_u = g * (delta * u)[:, None, :]  # dL/dB_t per channel
        ddelta = tl.sum(g * Bt * u[:, None, :] + d_logdecay * A_nat[:, :, None], axis=1)
        du = tl.sum(g * Bt, axis=1) * delta
        if HAS_D:
            du += Dv[:, None] * dy
            dD_acc += tl.sum(tl.where(m, dy * u, 0.0), axis=1)
        dA_acc += tl.sum(d_logdecay * delta[:, None, :], axis=2)
        if B_VARIABLE:
            _accumulate_projection(p_dB, g_u, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, b_per_group, B_GROUPED)
        else:
            dB_acc += tl.sum(g_u, axis=2)
        h_dy = hs * dy[:, None, :]
        if C_VARIABLE:
            _accumulate_projection(p_dC, h_dy, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, c_per_group, C_GROUPED)
        else:
            dC_acc += tl.sum(tl.where(m_t[None, None, :], h_dy, 0.0), axis=2)
        if SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(delta_raw)
        ddelta = tl.where(m, ddelta, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddelta, axis=1)
        tl.store(p_ddelta + offs, ddelta.to(p_ddelta.dtype.element_ty), mask=m)
        tl.store(p_du + offs, du.to(p_du.dtype.element_ty), mask=m)

    if HAS_H0:
        # dL/dh_{-1} = a_0 g_0; the first token never starts a new sequence.
        offs0 = (i_b * dim + o_d[:, None]) * length + tl.zeros((1, 1), dtype=tl.int32)  # token 0, (BLOCK_D, 1)
        delta0, _ = _delta(p_delta, p_bias, offs0, o_d, m_d[:, None], m_d, HAS_BIAS, SOFTPLUS)
        a0 = tl.exp2(delta0 * A2)  # [BD, 1] * [BD, N]
        tl.store(p_dh0 + o_state, a0 * g_carry, mask=m_dn)
    o_param = o_d[:, None] * n + o_n[None, :]
    tl.atomic_add(p_dA + o_param, dA_acc, mask=m_dn)
    if not B_VARIABLE:
        tl.atomic_add(p_dB + o_param, dB_acc, mask=m_dn)
    if not C_VARIABLE:
        tl.atomic_add(p_dC + o_param, dC_acc, mask=m_dn)
    if HAS_D:
        tl.atomic_add(p_dD + o_d, dD_acc, mask=m_d)
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, dbias_acc, mask=m_d)


@triton.jit
def _accumulate_projection(p_dX, grad, i_b, o_d, o_n, o_t, m_d, m_n, m_t, dim, n, length, channels_per_group,
                           GROUPED: tl.constexpr):
    """Add a (BLOCK_D, N, BLOCK_L) per-channel gradient into the fp32 (b, g, n, l) buffer."""
    if GROUPED:
        groups = dim // channels_per_group
        o_g = o_d // channels_per_group
        offs = ((i_b * groups + o_g[:, None, None]) * n + o_n[None, :, None]) * length + o_t[None, None, :]
        m = m_d[:, None, None] & m_n[None, :, None] & m_t[None, None, :]
        tl.atomic_add(p_dX + offs, grad, mask=m)
    else:
        grad = tl.sum(tl.where(m_d[:, None, None], grad, 0.0), axis=0)  # [N, BL]
        offs = (i_b * n + o_n[:, None]) * length + o_t[None, :]
        tl.atomic_add(p_dX + offs, grad, mask=m_n[:, None] & m_t[None, :])
