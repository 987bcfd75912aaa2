"""Triton kernels of the Mamba-1 selective scan (real A), forward and backward.

Layout: one program per (batch row, block of BLOCK_D channels). It walks the sequence in tiles of
BLOCK_L tokens (time is the contiguous axis of u, delta, z, B and C, so every load is a coalesced
vector load) and, inside a tile, loops over the n state entries: for each entry the recurrence
h_t = a_t h_{t-1} + b_t is a parallel associative scan along time of a (BLOCK_D, BLOCK_L) tile,
mostly sequential within each thread. The (b, d, l, n) state never touches memory: the forward
keeps each tile's final state (b, d, n_tiles, n) when a backward will need it, and the backward
walks the tiles in reverse, recomputing a tile's states from the stored start state, then the
adjoint by a reverse scan.

Why exp2: the hardware exponential is base 2; A is scaled by log2(e) on load.
Why fp32: every decay, state and reduction is float32 whatever the input dtype.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _configs(backward: bool = False):
    # BLOCK_L is fixed by the launcher (the backward restarts from the forward's tile states); the
    # channel block and warps trade registers against parallelism. The interpreter (CI on CPU)
    # has nothing to tune and no device to time: one config.
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return [triton.Config({"BLOCK_D": 2}, num_warps=4)]
    # Each thread should own many consecutive tokens (the scan is then mostly sequential in
    # registers): with 1024-token tiles, 2-4 warps give 8-16 tokens per thread and channel.
    if backward:
        # The backward keeps ~2x the live tiles of the forward; with 4 warps it spills (255
        # registers, 1.1 KB of stack per thread), yet 8-16 warps measured slower (NOTES.md, v5).
        return [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd, w in ((1, 4), (2, 4), (1, 8), (2, 8))]
    return [triton.Config({"BLOCK_D": bd}, num_warps=w) for bd, w in ((1, 2), (1, 4), (2, 4), (4, 4), (2, 8), (4, 8))]


@triton.jit
def _combine(a_first, b_first, a_second, b_second):
    """Affine maps h -> a h + b: apply ``first`` then ``second``."""
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _softplus(x):
    # log(1 + e^x), switching to the identity above 20 like torch's threshold.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _delta(p_delta, p_bias, offs, o_d, m, m_d, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(Delta, pre-softplus value) tiles (BLOCK_D, BLOCK_L) in fp32."""
    raw = tl.load(p_delta + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    value = raw
    if SOFTPLUS:
        value = _softplus(raw)
    return value, raw


@triton.jit
def _row(p_X, i_b, i_n, o_d, o_t, m_d, m_t, dim, n, length, per_group,
         VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """Entry i_n of B or C for the tile, fp32: (BLOCK_D, 1) if time-invariant (d, n), (1, BLOCK_L)
    if variable and shared by all channels, (BLOCK_D, BLOCK_L) if grouped."""
    if not VARIABLE:
        X = tl.load(p_X + o_d * n + i_n, mask=m_d, other=0.0).to(tl.float32)[:, None]
    elif GROUPED:
        o_g = o_d // per_group
        offs = ((i_b * (dim // per_group) + o_g[:, None]) * n + i_n) * length + o_t[None, :]
        X = tl.load(p_X + offs, mask=m_d[:, None] & m_t[None, :], other=0.0).to(tl.float32)
    else:
        X = tl.load(p_X + (i_b * n + i_n) * length + o_t, mask=m_t, other=0.0).to(tl.float32)[None, :]
    return X


@triton.jit
def _add_row(p_dX, grad, i_b, i_n, o_d, o_t, m_d, m_t, dim, n, length, per_group, GROUPED: tl.constexpr):
    """Add a (BLOCK_D, BLOCK_L) per-channel gradient of a variable B or C into its fp32 buffer,
    summing the block's channels first when they share one row."""
    if GROUPED:
        o_g = o_d // per_group
        offs = ((i_b * (dim // per_group) + o_g[:, None]) * n + i_n) * length + o_t[None, :]
        tl.atomic_add(p_dX + offs, grad, mask=m_d[:, None] & m_t[None, :])
    else:
        tl.atomic_add(p_dX + (i_b * n + i_n) * length + o_t, tl.sum(grad, axis=0), mask=m_t)


@triton.jit
def _resets(p_seq, i_b, o_t, m_t, length, HAS_SEQ: tl.constexpr):
    """(BLOCK_L,) True where a new packed sequence starts (seq_idx changes); never at t = 0."""
    if HAS_SEQ:
        here = tl.load(p_seq + i_b * length + o_t, mask=m_t, other=0)
        before = tl.load(p_seq + i_b * length + o_t - 1, mask=m_t & (o_t > 0), other=0)
        r = (here != before) & (o_t > 0)
    else:
        r = o_t < 0
    return r


@triton.jit
def _pick(x, o_n, i_n):
    """Column i_n of a (BLOCK_D, NP) register tile, as (BLOCK_D,)."""
    return tl.sum(tl.where(o_n[None, :] == i_n, x, 0.0), axis=1)


@triton.autotune(configs=_configs(), key=["N", "HAS_Z", "B_VARIABLE", "C_VARIABLE", "B_GROUPED", "C_GROUPED", "SAVE_STATES"])
@triton.jit
def selective_scan_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq,
    p_y, p_ypre, p_last, p_states,
    dim, length, b_per_group, c_per_group,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_STATES: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    n_tiles = tl.cdiv(length, BLOCK_L)
    # The state carried between tiles goes through memory: the thread holding a tile's last token
    # stores it into the tile-state buffer, and after a barrier every thread loads it. This avoids
    # a cross-thread reduction per state entry and tile (and the backward reuses the buffer).
    o_tile_state = (i_b * dim + o_d) * n_tiles * N  # (BLOCK_D,) start of each channel's (n_tiles, n)
    for i_t in range(0, n_tiles):
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        offs = (i_b * dim + o_d[:, None]) * length + o_t[None, :]  # (BLOCK_D, BLOCK_L) into (b, d, l)
        u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
        delta, _ = _delta(p_delta, p_bias, offs, o_d, m, m_d, HAS_BIAS, SOFTPLUS)
        drive = delta * u
        reset = _resets(p_seq, i_b, o_t, m_t, length, HAS_SEQ)
        y = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for i_n in range(0, N):
            if i_t > 0:
                h_n = tl.load(p_states + o_tile_state + (i_t - 1) * N + i_n, mask=m_d, other=0.0)
            elif HAS_H0:
                h_n = tl.load(p_h0 + (i_b * dim + o_d) * N + i_n, mask=m_d, other=0.0).to(tl.float32)
            else:
                h_n = tl.zeros((BLOCK_D,), dtype=tl.float32)
            A_n = tl.load(p_A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32) * 1.4426950408889634
            a = tl.exp2(delta * A_n[:, None])
            # Padding is the identity map; a new packed sequence forgets the state.
            a = tl.where(m_t[None, :], tl.where(reset[None, :], 0.0, a), 1.0)
            b = drive * _row(p_B, i_b, i_n, o_d, o_t, m_d, m_t, dim, N, length, b_per_group, B_VARIABLE, B_GROUPED)
            a_scan, b_scan = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
            hs = a_scan * h_n[:, None] + b_scan  # (BLOCK_D, BLOCK_L)
            y += hs * _row(p_C, i_b, i_n, o_d, o_t, m_d, m_t, dim, N, length, c_per_group, C_VARIABLE, C_GROUPED)
            tl.store(p_states + o_tile_state[:, None] + i_t * N + i_n + 0 * o_l[None, :], hs,
                     mask=m_d[:, None] & (o_l == BLOCK_L - 1)[None, :])
        tl.debug_barrier()
        if HAS_D:
            y += tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None] * u
        if HAS_Z:
            if SAVE_STATES:  # the backward needs the output before the gate
                tl.store(p_ypre + offs, y.to(p_ypre.dtype.element_ty), mask=m)
            zv = tl.load(p_z + offs, mask=m, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(p_y + offs, y.to(p_y.dtype.element_ty), mask=m)
    h = tl.load(p_states + o_tile_state[:, None] + (n_tiles - 1) * N + o_n[None, :], mask=m_dn, other=0.0)
    tl.store(p_last + (i_b * dim + o_d[:, None]) * N + o_n[None, :], h, mask=m_dn)


@triton.autotune(configs=_configs(backward=True), key=["N", "HAS_Z", "B_VARIABLE", "C_VARIABLE", "B_GROUPED", "C_GROUPED"],
                 reset_to_zero=["p_dA", "p_dB", "p_dC", "p_dD", "p_dbias"], restore_value=["p_gcarry"])
@triton.jit
def selective_scan_bwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq, p_states, p_ypre, p_dy, p_gcarry,
    p_du, p_ddelta, p_dA, p_dB, p_dC, p_dD, p_dz, p_dbias, p_dh0,
    dim, length, b_per_group, c_per_group,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    o_state = (i_b * dim + o_d[:, None]) * N + o_n[None, :]
    dA_acc = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    dB_acc = tl.zeros((BLOCK_D, NP), dtype=tl.float32)  # time-invariant B only
    dC_acc = tl.zeros((BLOCK_D, NP), dtype=tl.float32)  # time-invariant C only
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n_tiles = tl.cdiv(length, BLOCK_L)
    o_tile_state = (i_b * dim + o_d) * n_tiles * N
    # g_carry (b, d, 2, n), double-buffered by tile parity: the total gradient of each state entry
    # just after the current tile (the final state's own gradient at the end of the sequence, put
    # in slot 0 by the launcher). Read from one slot, written to the other, a barrier per tile.
    o_carry = (i_b * dim + o_d) * 2 * N
    for i_rev in range(0, n_tiles):
        i_t = n_tiles - 1 - i_rev
        read_slot = i_rev % 2
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < length
        m = m_d[:, None] & m_t[None, :]
        offs = (i_b * dim + o_d[:, None]) * length + o_t[None, :]
        u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
        delta, delta_raw = _delta(p_delta, p_bias, offs, o_d, m, m_d, HAS_BIAS, SOFTPLUS)
        drive = delta * u
        reset = _resets(p_seq, i_b, o_t, m_t, length, HAS_SEQ)
        dout = tl.load(p_dy + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.load(p_ypre + offs, mask=m, other=0.0).to(tl.float32)
            zv = tl.load(p_z + offs, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            dy = dout * zv * sig
            tl.store(p_dz + offs, (dout * y * sig * (1.0 + zv * (1.0 - sig))).to(p_dz.dtype.element_ty), mask=m)
        else:
            dy = dout
        dy = tl.where(m, dy, 0.0)
        # Decay into the next token: 1 after the last token (the final state's gradient enters
        # there), 0 where the next token starts a new packed sequence.
        o_next = o_t + 1
        m_next = m_d[:, None] & (o_next < length)[None, :]
        delta_next, _ = _delta(p_delta, p_bias, offs + 1, o_d, m_next, m_d, HAS_BIAS, SOFTPLUS)
        reset_next = _resets(p_seq, i_b, o_next, o_next < length, length, HAS_SEQ)
        ddelta = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        du = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for i_n in range(0, N):
            if i_t > 0:
                h_n = tl.load(p_states + o_tile_state + (i_t - 1) * N + i_n, mask=m_d, other=0.0)
            elif HAS_H0:
                h_n = tl.load(p_h0 + (i_b * dim + o_d) * N + i_n, mask=m_d, other=0.0).to(tl.float32)
            else:
                h_n = tl.zeros((BLOCK_D,), dtype=tl.float32)
            A_nat = tl.load(p_A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32)
            A_n = A_nat * 1.4426950408889634
            a = tl.exp2(delta * A_n[:, None])
            a = tl.where(m_t[None, :], tl.where(reset[None, :], 0.0, a), 1.0)
            B_n = _row(p_B, i_b, i_n, o_d, o_t, m_d, m_t, dim, N, length, b_per_group, B_VARIABLE, B_GROUPED)
            C_n = _row(p_C, i_b, i_n, o_d, o_t, m_d, m_t, dim, N, length, c_per_group, C_VARIABLE, C_GROUPED)
            b = tl.where(m_t[None, :], drive * B_n, 0.0)
            a_scan, b_scan = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
            hs = a_scan * h_n[:, None] + b_scan  # recomputed states
            a_next = tl.exp2(delta_next * A_n[:, None])
            a_next = tl.where((o_next < length)[None, :], tl.where(reset_next[None, :], 0.0, a_next), 1.0)
            ga, gb = tl.associative_scan((a_next, C_n * dy), axis=1, combine_fn=_combine, reverse=True)
            g_after = tl.load(p_gcarry + o_carry + read_slot * N + i_n, mask=m_d, other=0.0)
            g = gb + ga * g_after[:, None]  # dL/dh_t
            tl.store(p_gcarry + o_carry[:, None] + (1 - read_slot) * N + i_n + 0 * o_l[None, :], g,
                     mask=m_d[:, None] & (o_l == 0)[None, :])

            d_logdecay = tl.where(m, g * (hs - b), 0.0)  # dL/d(Delta A) = g_t a_t h_{t-1}
            ddelta += g * B_n * u + d_logdecay * A_nat[:, None]
            du += g * B_n
            dA_n = tl.sum(d_logdecay * delta, axis=1)
            dA_acc = tl.where((o_n == i_n)[None, :], dA_acc + dA_n[:, None], dA_acc)
            g_drive = tl.where(m, g * drive, 0.0)  # dL/dB per channel
            h_dy = hs * dy  # dL/dC per channel
            if B_VARIABLE:
                _add_row(p_dB, g_drive, i_b, i_n, o_d, o_t, m_d, m_t, dim, N, length, b_per_group, B_GROUPED)
            else:
                dB_acc = tl.where((o_n == i_n)[None, :], dB_acc + tl.sum(g_drive, axis=1)[:, None], dB_acc)
            if C_VARIABLE:
                _add_row(p_dC, h_dy, i_b, i_n, o_d, o_t, m_d, m_t, dim, N, length, c_per_group, C_GROUPED)
            else:
                dC_acc = tl.where((o_n == i_n)[None, :], dC_acc + tl.sum(h_dy, axis=1)[:, None], dC_acc)
        tl.debug_barrier()
        du = du * delta
        if HAS_D:
            D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32)
            du += D[:, None] * dy
            dD_acc += tl.sum(dy * u, axis=1)
        if SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(delta_raw)
        ddelta = tl.where(m, ddelta, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddelta, axis=1)
        tl.store(p_ddelta + offs, ddelta.to(p_ddelta.dtype.element_ty), mask=m)
        tl.store(p_du + offs, du.to(p_du.dtype.element_ty), mask=m)

    if HAS_H0:
        # dL/dh_{-1} = a_0 g_0 (the first token never starts a new sequence).
        offs0 = (i_b * dim + o_d[:, None]) * length + tl.zeros((1, 1), dtype=tl.int32)  # token 0, (BLOCK_D, 1)
        delta0, _ = _delta(p_delta, p_bias, offs0, o_d, m_d[:, None], m_d, HAS_BIAS, SOFTPLUS)
        A_all = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
        g0 = tl.load(p_gcarry + o_carry[:, None] + (n_tiles % 2) * N + o_n[None, :], mask=m_dn, other=0.0)
        tl.store(p_dh0 + o_state, tl.exp2(delta0 * A_all * 1.4426950408889634) * g0, mask=m_dn)
    o_param = o_d[:, None] * N + o_n[None, :]
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
def selective_scan_step_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_y, p_last,
    dim, b_per_group, c_per_group,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One decode token (l = 1): h = exp(Delta A) h + Delta B u, y = <C, h> + D u, gated by z.

    No scan and no tiles over time: one (BLOCK_D, N) state update per program.
    """
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    o_tok = i_b * dim + o_d  # (BLOCK_D,) into (b, d, 1)
    o_state = o_tok[:, None] * N + o_n[None, :]
    u = tl.load(p_u + o_tok, mask=m_d, other=0.0).to(tl.float32)
    delta = tl.load(p_delta + o_tok, mask=m_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        delta += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        delta = _softplus(delta)
    A = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    Bv = _step_projection(p_B, i_b, o_d, o_n, m_d, m_dn, dim, b_per_group, N, B_VARIABLE, B_GROUPED)
    Cv = _step_projection(p_C, i_b, o_d, o_n, m_d, m_dn, dim, c_per_group, N, C_VARIABLE, C_GROUPED)
    if HAS_H0:
        h = tl.load(p_h0 + o_state, mask=m_dn, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    h = tl.exp2(delta[:, None] * A * 1.4426950408889634) * h + (delta * u)[:, None] * Bv
    y = tl.sum(h * Cv, axis=1)
    if HAS_D:
        y += tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32) * u
    if HAS_Z:
        zv = tl.load(p_z + o_tok, mask=m_d, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(p_y + o_tok, y.to(p_y.dtype.element_ty), mask=m_d)
    tl.store(p_last + o_state, h, mask=m_dn)


@triton.jit
def _step_projection(p_X, i_b, o_d, o_n, m_d, m_dn, dim, per_group, N: tl.constexpr,
                     VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """B or C at the single token as a (BLOCK_D, NP) or (1, NP) fp32 tile."""
    if not VARIABLE:
        X = tl.load(p_X + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    elif GROUPED:
        o_g = o_d // per_group
        X = tl.load(p_X + (i_b * (dim // per_group) + o_g[:, None]) * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    else:
        X = tl.load(p_X + i_b * N + o_n, mask=o_n < N, other=0.0).to(tl.float32)[None, :]
    return X
