"""Triton kernels of the Mamba-1 selective scan (real A), forward and backward.

Layout: one program per (batch row, block of BLOCK_D channels) walks the sequence in tiles of
BLOCK_L tokens; inside a tile it loops over the n state entries, and for each entry the recurrence
h_t = a_t h_{t-1} + b_t is an associative scan of a (BLOCK_D, BLOCK_L) tile along time. Time is
the contiguous axis of u, delta and z, so a thread loads 8 consecutive tokens of one channel as
one vector, and the scan over those 8 runs sequentially in its registers: with BLOCK_L = 8 a tile
holds 32 channels per warp and the scan never leaves the thread; longer tiles spread a channel's
tokens over BLOCK_L / 8 lanes (more programs for few channels, at the cost of shuffles). The state
carried from tile to tile is a (BLOCK_D, n) register tile: each thread keeps the entries of its
own channels, so reading and writing one entry compiles to register moves (``_column`` with a
constant index). The (b, d, l, n) state never touches memory. The forward's main kernel can
also split the entries over G warps of a program (tiles gain a leading group axis; y is summed
over the groups once per tile).

For the backward the forward also stores the state at the end of every chunk of SAVE_EVERY
tokens; the backward walks those chunks in reverse (one chunk per tile), recomputes the chunk's
states from the stored start state and runs the adjoint recurrence as a forward scan of its
inputs in descending time (Triton 3.6 lowers ``reverse=True`` scans and flips with many
shuffles; only the result is flipped back). Its loop over state entries is not unrolled and is
software-pipelined; the per-entry carries live in a per-program scratch.

With few channels the sequence is also split over programs (CHUNK tokens each): a first kernel
gives each chunk's end state (forward) or start adjoint (backward) from a zero start, with the
product of its decays, and each program of the main kernel combines those of the chunks before
(after) it into its own start.

Why exp2: the hardware exponential is base 2; A is scaled by log2(e) on load.
Why fp32: every decay, state and reduction is float32 whatever the input dtype. B and C arrive as
float32 (the launcher converts them: they are small, and converting each broadcast value in every
thread would cost two instructions per state element).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _combine(a_first, b_first, a_second, b_second):
    """Affine maps h -> a h + b: apply ``first`` then ``second``."""
    return a_first * a_second, a_second * b_first + b_second


@triton.jit
def _softplus(x):
    # log(1 + e^x), switching to the identity above 20 like torch's threshold.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(x)), x)


@triton.jit
def _column(x, o_col, i_col: tl.constexpr):
    """Column i_col of a 2-D tile, as a vector over its rows. With the column axis inside each
    thread and a constant i_col this is a register read, not a reduction."""
    return tl.sum(tl.where(o_col[None, :] == i_col, x, 0.0), axis=1)


@triton.jit
def _set_column(x, o_col, i_col: tl.constexpr, value):
    return tl.where(o_col[None, :] == i_col, value[:, None], x)


@triton.jit
def _load_columns(p_X, rows, m_rows, N: tl.constexpr, NP: tl.constexpr):
    """(len(rows), NP) fp32 tile of a row-major (*, N) tensor, loaded one column at a time: the
    tile then takes the layout of its columns (one row per lane, the NP entries in the thread)
    instead of the vectorised layout of a 2-D load, which would spread NP over lanes and turn
    every ``_column`` into shuffles."""
    o_n = tl.arange(0, NP)
    x = tl.zeros((rows.shape[0], NP), dtype=tl.float32)
    for i_n in tl.static_range(N):
        x = _set_column(x, o_n, i_n, tl.load(p_X + rows * N + i_n, mask=m_rows, other=0.0).to(tl.float32))
    return x


@triton.jit
def _delta(p_delta, offs, m, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(Delta, pre-softplus value) tiles in fp32; Delta is 0 where ``m`` is False. ``bias``: the
    channels' delta_bias shaped to broadcast against the tile ((BLOCK_D, 1) for 2-D tiles)."""
    raw = tl.load(p_delta + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias
    value = raw
    if SOFTPLUS:
        value = _softplus(raw)
    # Delta = 0 makes a padded token the identity map: a = exp(0) = 1, b = 0.
    return tl.where(m, value, 0.0), raw


@triton.jit
def _projection(p_X, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, per_group, N: tl.constexpr,
                VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """Entry i_n of B or C (fp32) for the tile: (BLOCK_D, 1) if time-invariant (d, n),
    (1, BLOCK_L) if variable and shared by all channels (b, n, l), (BLOCK_D, BLOCK_L) if grouped
    (b, g, n, l)."""
    if not VARIABLE:
        X = tl.load(p_X + o_d * N + i_n, mask=m_d, other=0.0)[:, None]
    elif GROUPED:
        row = ((i_b * (dim // per_group) + o_d // per_group) * N + i_n).to(tl.int64) * length
        X = tl.load(p_X + row[:, None] + o_t[None, :], mask=m_d[:, None] & m_t[None, :], other=0.0)
    else:
        row = (i_b * N + i_n).to(tl.int64) * length
        X = tl.load(p_X + row + o_t, mask=m_t, other=0.0)[None, :]
    return X


@triton.jit
def _add_projection_grad(p_dX, grad, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, per_group,
                         N: tl.constexpr, GROUPED: tl.constexpr):
    """Add a (BLOCK_D, BLOCK_L) per-channel gradient of a variable B or C into its fp32 buffer,
    summing the block's channels first when they share one row."""
    if GROUPED:
        row = ((i_b * (dim // per_group) + o_d // per_group) * N + i_n).to(tl.int64) * length
        tl.atomic_add(p_dX + row[:, None] + o_t[None, :], grad, mask=m_d[:, None] & m_t[None, :], sem="relaxed")
    else:
        row = (i_b * N + i_n).to(tl.int64) * length
        # Kept 2-D (1, BLOCK_L): the reduced row stays in the tile's layout, no conversion.
        tl.atomic_add(p_dX + row + o_t[None, :], tl.sum(grad, axis=0)[None, :], mask=m_t[None, :],
                      sem="relaxed")


@triton.jit
def _rows(i_b, o_d, stride_b, stride_d):
    """int64 offsets of channels o_d (any shape) of batch row i_b in a (b, d, l) tensor."""
    return i_b.to(tl.int64) * stride_b + o_d.to(tl.int64) * stride_d


@triton.jit
def _at(row, o_t, stride_l):
    """(BLOCK_D, BLOCK_L) offsets: channel rows ``row`` at times ``o_t``."""
    return row[:, None] + o_t[None, :].to(tl.int64) * stride_l


@triton.jit
def _accumulate(p, value, mask):
    """*p += value, for a thread's own entries (no other program touches them)."""
    tl.store(p, tl.load(p, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _flush_slot(p_param, p_slot, o_param, mask):
    """Add a program's (BLOCK_D, NP) scratch accumulator into a (d, n) parameter gradient."""
    tl.atomic_add(p_param + o_param, tl.load(p_slot, mask=mask, other=0.0), mask=mask, sem="relaxed")


@triton.jit
def _resets(p_seq, i_b, o_t, length, HAS_SEQ: tl.constexpr):
    """(BLOCK_L,) True where a new packed sequence starts (seq_idx changes); never at t = 0 or
    past the end."""
    if HAS_SEQ:
        m = (o_t > 0) & (o_t < length)
        here = tl.load(p_seq + i_b * length + o_t, mask=m, other=0)
        before = tl.load(p_seq + i_b * length + o_t - 1, mask=m, other=0)
        r = (here != before) & m
    else:
        r = o_t < 0
    return r


@triton.jit
def _forward_tile_inputs(p_u, p_delta, p_seq, bias, row, m_d, o_t, i_b, length, stride_l,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """A forward tile's offsets and mask, and its per-token inputs (fp32): u, Delta, the drive
    Delta u, and where packed sequences start."""
    m = m_d[:, None] & (o_t < length)[None, :]
    offs = _at(row, o_t, stride_l)
    u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
    delta, _ = _delta(p_delta, offs, m, bias, HAS_BIAS, SOFTPLUS)
    return offs, m, u, delta, delta * u, _resets(p_seq, i_b, o_t, length, HAS_SEQ)


@triton.jit
def _scan_entry(delta, drive, reset, A_n, B_n, h_n, o_l, HAS_SEQ: tl.constexpr):
    """State entry n over a tile: (running decay products, states h_t), the carried state h_n
    (BLOCK_D,) entering through the first token (b_0 += a_0 h_n); A_n in log2 units."""
    a = tl.exp2(delta * A_n[:, None])
    if HAS_SEQ:
        a = tl.where(reset[None, :], 0.0, a)  # a new packed sequence forgets the state
    b = drive * B_n
    b = tl.where(o_l[None, :] == 0, b + a * h_n[:, None], b)
    return tl.associative_scan((a, b), axis=1, combine_fn=_combine)


@triton.jit
def _backward_tile_inputs(p_u, p_delta, p_z, p_ypre, p_dy, p_dz, p_seq, bias, row, z_row, dy_row, m_d, o_t, i_b,
                          length, stride_l, stride_zl, stride_dyl,
                          HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """A backward tile's offsets and mask, and its per-token inputs (fp32): u, Delta, Delta
    before softplus, the drive Delta u, resets and the gradient reaching the scan's output;
    stores dz."""
    m = m_d[:, None] & (o_t < length)[None, :]
    offs = _at(row, o_t, stride_l)
    u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
    delta, delta_raw = _delta(p_delta, offs, m, bias, HAS_BIAS, SOFTPLUS)
    reset = _resets(p_seq, i_b, o_t, length, HAS_SEQ)
    dout = tl.load(p_dy + _at(dy_row, o_t, stride_dyl), mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        y = tl.load(p_ypre + offs, mask=m, other=0.0).to(tl.float32)
        zv = tl.load(p_z + _at(z_row, o_t, stride_zl), mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zv)
        dy = dout * zv * sig
        tl.store(p_dz + offs, (dout * y * sig * (1.0 + zv * (1.0 - sig))).to(p_dz.dtype.element_ty), mask=m)
    else:
        dy = dout
    return offs, m, u, delta, delta_raw, delta * u, reset, dy


@triton.jit
def _next_decay_inputs(p_delta, p_seq, bias, row, m_d, o_t, o_rev, i_b, length, stride_l,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Delta (BLOCK_D, BLOCK_L) and resets (BLOCK_L,) of the token after each tile token, in
    descending time (o_rev is o_t reversed); Delta 0 past the end, so that the final state's
    adjoint enters with a = 1.

    Descending time makes the adjoint's reverse scan a forward scan. The Delta tile is loaded in
    ascending order and flipped once per tile: Triton sees no contiguity in descending offsets and
    would load it one element per lane, in a layout that the whole tile computation then adopts.
    1-D rows (resets here, B/C rows in ``_projection_rev``) go through a layout conversion anyway
    and are loaded descending directly."""
    m_next = m_d[:, None] & (o_t + 1 < length)[None, :]
    delta_next, _ = _delta(p_delta, _at(row, o_t + 1, stride_l), m_next, bias, HAS_BIAS, SOFTPLUS)
    return tl.flip(delta_next, 1), _resets(p_seq, i_b, o_rev + 1, length, HAS_SEQ)


@triton.jit
def _projection_rev(p_X, i_b, i_n, o_d, o_t, o_rev, m_d, dim, length, per_group, N: tl.constexpr,
                    VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """``_projection`` in descending time (o_rev is o_t reversed; see ``_next_decay_inputs``)."""
    if GROUPED:
        X = tl.flip(_projection(p_X, i_b, i_n, o_d, o_t, m_d, o_t < length, dim, length, per_group, N, VARIABLE,
                                GROUPED), 1)
    else:
        X = _projection(p_X, i_b, i_n, o_d, o_rev, m_d, o_rev < length, dim, length, per_group, N, VARIABLE, GROUPED)
    return X


@triton.jit
def _backward_tile_outputs(p_D, p_du, p_ddelta, du, ddelta, u, delta, delta_raw, dy, offs, m, o_d, m_d, dD_acc,
                           dbias_acc, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Finish and store a tile's du and dDelta from their sums over state entries (du still
    without its Delta factor); return the updated dD and d delta_bias sums."""
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
    return dD_acc, dbias_acc


@triton.jit
def _group_projection(p_X, i_b, n, o_d, o_t, m_d, m_t, dim, length, per_group, N: tl.constexpr,
                      VARIABLE: tl.constexpr, GROUPED: tl.constexpr):
    """Entries n (G, 1, 1) of B or C (fp32) for a (G, BLOCK_D, BLOCK_L) tile: (G, BLOCK_D, 1) if
    time-invariant (d, n), (G, 1, BLOCK_L) if variable and shared by all channels (b, n, l),
    (G, BLOCK_D, BLOCK_L) if grouped (b, g, n, l); 0 for padded entries (n >= N)."""
    m_n = n < N
    if not VARIABLE:
        X = tl.load(p_X + o_d * N + n, mask=m_d & m_n, other=0.0)
    elif GROUPED:
        row = ((i_b * (dim // per_group) + o_d // per_group) * N + n).to(tl.int64) * length
        X = tl.load(p_X + row + o_t, mask=m_d & m_t & m_n, other=0.0)
    else:
        row = (i_b * N + n).to(tl.int64) * length
        X = tl.load(p_X + row + o_t, mask=m_t & m_n, other=0.0)
    return X


@triton.jit
def _entry(x, o_e, i_e: tl.constexpr):
    """Element i_e of the last axis of a 3-D tile, o_e its (1, 1, E) index: (G, BLOCK_D, 1). With
    that axis inside the thread and a constant i_e, a register read."""
    return tl.sum(tl.where(o_e == i_e, x, 0.0), axis=2, keep_dims=True)


@triton.jit
def selective_scan_fwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq,
    p_y, p_ypre, p_last, p_states, p_chunk_h, p_chunk_decay,
    dim, length, b_per_group, c_per_group, n_saved, n_chunks,
    stride_xb, stride_xd, stride_xl, stride_zb, stride_zd, stride_zl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, SAVE_STATES: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, G: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    SAVE_EVERY: tl.constexpr, CHUNK: tl.constexpr,
):
    """y (b, d, l), the final state (b, d, n) and, if SAVE_STATES, the state at the end of each
    SAVE_EVERY-token chunk (b, d, n_saved, n) and the output before the z gate.

    The NP (padded) state entries are split into G groups of E = NP / G, a warp each (launch
    with G warps per program): tiles are (G, BLOCK_D, BLOCK_L), every warp reads the same token
    inputs (L1 hits after the first) and scans its own E entries, and y is summed over the groups
    at the end of each tile. More warps per channel block than one hides memory latency where
    there are too few channel blocks to fill the GPU, without splitting the sequence.

    Program (i_d, i_b, i_c) covers tokens [i_c CHUNK, (i_c + 1) CHUNK). Its start state combines
    the initial state with the earlier chunks' zero-start end states and decays (from
    ``selective_scan_chunk_state_kernel``): h <- decay_k h + h_k for k < i_c."""
    E: tl.constexpr = NP // G
    i_d, i_b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_g = tl.arange(0, G)[:, None, None]
    o_e = tl.arange(0, E)[None, None, :]
    o_d = (i_d * BLOCK_D + tl.arange(0, BLOCK_D))[None, :, None]
    o_l = tl.arange(0, BLOCK_L)[None, None, :]
    m_d = o_d < dim
    n_ge = o_g * E + o_e  # (G, 1, E) state entry index
    m_de = m_d & (n_ge < N)
    A = tl.load(p_A + o_d * N + n_ge, mask=m_de, other=0.0).to(tl.float32) * LOG2E  # (G, BLOCK_D, E)
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32) if HAS_BIAS else None
    D = tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32) if HAS_D else None
    o_state = (i_b * dim + o_d).to(tl.int64) * N + n_ge  # (G, BLOCK_D, E) into (b, d, n)
    if HAS_H0:
        h = tl.load(p_h0 + o_state, mask=m_de, other=0.0).to(tl.float32)
    else:
        h = tl.zeros((G, BLOCK_D, E), dtype=tl.float32)
    for k in range(0, i_c):
        o_chunk = ((i_b * n_chunks + k) * dim + o_d).to(tl.int64) * N + n_ge
        h = (tl.load(p_chunk_decay + o_chunk, mask=m_de, other=0.0) * h
             + tl.load(p_chunk_h + o_chunk, mask=m_de, other=0.0))
    # (G, BLOCK_D, 1) start of each channel in (b, d, l), repeated per group: each warp loads the tile.
    row = _rows(i_b, o_d, stride_xb, stride_xd) + o_g * 0
    # The same in 2-D (BLOCK_D, BLOCK_L), for the output after the sum over groups.
    o_d2 = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row2 = _rows(i_b, o_d2, stride_xb, stride_xd)
    z_row2 = _rows(i_b, o_d2, stride_zb, stride_zd)
    for t0 in range(i_c * CHUNK, tl.minimum((i_c + 1) * CHUNK, length), BLOCK_L):
        o_t = t0 + o_l
        m_t = o_t < length
        m = m_d & m_t
        offs = row + o_t.to(tl.int64) * stride_xl
        u = tl.load(p_u + offs, mask=m, other=0.0).to(tl.float32)
        delta, _ = _delta(p_delta, offs, m, bias, HAS_BIAS, SOFTPLUS)  # padded tokens: identity maps
        drive = delta * u
        reset = _resets(p_seq, i_b, o_t, length, HAS_SEQ)
        y = tl.zeros((G, BLOCK_D, BLOCK_L), dtype=tl.float32)
        for i_e in tl.static_range(E):
            n_i = o_g * E + i_e
            a = tl.exp2(delta * _entry(A, o_e, i_e))
            if HAS_SEQ:
                a = tl.where(reset, 0.0, a)  # a new packed sequence forgets the state
            b = drive * _group_projection(p_B, i_b, n_i, o_d, o_t, m_d, m_t, dim, length, b_per_group, N,
                                          B_VARIABLE, B_GROUPED)
            b = tl.where(o_l == 0, b + a * _entry(h, o_e, i_e), b)
            _, hs = tl.associative_scan((a, b), axis=2, combine_fn=_combine)
            y += hs * _group_projection(p_C, i_b, n_i, o_d, o_t, m_d, m_t, dim, length, c_per_group, N,
                                        C_VARIABLE, C_GROUPED)
            h = tl.where(o_e == i_e, _entry(hs, o_l, BLOCK_L - 1), h)  # the state after the tile
        if SAVE_STATES:
            # Padded tokens are identity maps, so at the last tile h is the final state.
            if ((t0 + BLOCK_L) % SAVE_EVERY == 0) | (t0 + BLOCK_L >= length):
                p_chunk = p_states + ((i_b * dim + o_d).to(tl.int64) * n_saved + t0 // SAVE_EVERY) * N
                tl.store(p_chunk + n_ge, h, mask=m_de)
        if HAS_D:
            y += tl.where(o_g == 0, D * u, 0.0)  # once, in the first group
        y_sum = tl.sum(y, axis=0)  # (BLOCK_D, BLOCK_L)
        offs2 = _at(row2, t0 + tl.arange(0, BLOCK_L), stride_xl)
        m2 = (o_d2 < dim)[:, None] & (t0 + tl.arange(0, BLOCK_L) < length)[None, :]
        if HAS_Z:
            if SAVE_STATES:  # the backward needs the output before the gate
                tl.store(p_ypre + offs2, y_sum.to(p_ypre.dtype.element_ty), mask=m2)
            zv = tl.load(p_z + _at(z_row2, t0 + tl.arange(0, BLOCK_L), stride_zl), mask=m2, other=0.0).to(tl.float32)
            y_sum = y_sum * zv * tl.sigmoid(zv)
        tl.store(p_y + offs2, y_sum.to(p_y.dtype.element_ty), mask=m2)
    if i_c == n_chunks - 1:
        tl.store(p_last + o_state, h, mask=m_de)


@triton.jit
def selective_scan_chunk_state_kernel(
    p_u, p_delta, p_A, p_B, p_bias, p_seq, p_chunk_h, p_chunk_decay,
    dim, length, b_per_group, n_chunks, stride_xb, stride_xd, stride_xl,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    B_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """First pass of a forward split over time: for chunk i_c of CHUNK tokens, the state at its
    end from a zero start (h_k) and the product of its decays (decay_k), both (b, n_chunks, d, n)
    fp32, so that the state after the chunk is decay_k (state before it) + h_k. A packed sequence
    starting inside the chunk makes decay_k zero."""
    i_d, i_b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    A = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else None
    h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    decay = h + 1.0
    row = _rows(i_b, o_d, stride_xb, stride_xd)
    for t0 in range(i_c * CHUNK, tl.minimum((i_c + 1) * CHUNK, length), BLOCK_L):
        o_t = t0 + o_l
        _, _, _, delta, drive, reset = _forward_tile_inputs(p_u, p_delta, p_seq, bias, row, m_d, o_t, i_b, length,
                                                            stride_xl, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        for i_n in tl.static_range(N):
            B_n = _projection(p_B, i_b, i_n, o_d, o_t, m_d, o_t < length, dim, length, b_per_group, N, B_VARIABLE,
                              B_GROUPED)
            a_scan, hs = _scan_entry(delta, drive, reset, _column(A, o_n, i_n), B_n, _column(h, o_n, i_n), o_l,
                                     HAS_SEQ)
            h = _set_column(h, o_n, i_n, _column(hs, o_l, BLOCK_L - 1))
            decay = _set_column(decay, o_n, i_n, _column(decay, o_n, i_n) * _column(a_scan, o_l, BLOCK_L - 1))
    o_chunk = ((i_b * n_chunks + i_c) * dim + o_d[:, None]).to(tl.int64) * N + o_n[None, :]
    tl.store(p_chunk_h + o_chunk, h, mask=m_dn)
    tl.store(p_chunk_decay + o_chunk, decay, mask=m_dn)


@triton.jit
def selective_scan_bwd_kernel(
    p_u, p_delta, p_A, p_B, p_C, p_D, p_z, p_bias, p_h0, p_seq, p_states, p_ypre, p_dy, p_dlast,
    p_du, p_ddelta, p_dA, p_dB, p_dC, p_dD, p_dz, p_dbias, p_dh0, p_chunk_g, p_chunk_decay, p_carry,
    dim, length, b_per_group, c_per_group, n_saved, n_chunks,
    stride_xb, stride_xd, stride_xl, stride_zb, stride_zd, stride_zl, stride_dyb, stride_dyd, stride_dyl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DLAST: tl.constexpr,
    B_VARIABLE: tl.constexpr, C_VARIABLE: tl.constexpr, B_GROUPED: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Gradients of the scan, one BLOCK_L = SAVE_EVERY chunk per tile, walking backwards.

    Program (i_d, i_b, i_c) covers tokens [i_c CHUNK, (i_c + 1) CHUNK). The adjoint entering it
    from the right combines dL/dh_last with the later chunks' zero-end adjoints and decays (from
    ``selective_scan_chunk_adjoint_kernel``): g <- g_k + decay_k g for k = n_chunks - 1 .. i_c + 1.

    With g_t = dL/dh_t (adjoint), a_t = exp(Delta_t A), b_t = Delta_t B_t u_t:
        g_t = C_t dy_t + a_{t+1} g_{t+1}          (reverse scan; a_{t+1} from the next token)
        dDelta_t += g_t (B_t u_t + A a_t h_{t-1}),   a_t h_{t-1} = h_t - b_t
        du_t += g_t Delta_t B_t,   dA += Delta_t g_t a_t h_{t-1},
        dB_t += g_t Delta_t u_t,   dC_t += dy_t h_t,   dh_{-1} = a_0 g_0.
    """
    i_d, i_b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else None
    o_state = (i_b * dim + o_d[:, None]).to(tl.int64) * N + o_n[None, :]
    # The adjoint of the state just after the chunk: dL/dh_last combined with the later chunks'.
    zeros = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    if HAS_DLAST:
        g_after = tl.load(p_dlast + o_state, mask=m_dn, other=0.0)
    else:
        g_after = zeros
    for k_rev in range(0, n_chunks - 1 - i_c):
        o_chunk = ((i_b * n_chunks + n_chunks - 1 - k_rev) * dim + o_d[:, None]).to(tl.int64) * N + o_n[None, :]
        g_after = (tl.load(p_chunk_g + o_chunk, mask=m_dn, other=0.0)
                   + tl.load(p_chunk_decay + o_chunk, mask=m_dn, other=0.0) * g_after)
    # Per state entry, the carries live in this program's slice of p_carry (L1-resident), read and
    # written one entry at a time, so that the loop over entries need not be unrolled: unrolled,
    # it holds every entry's B and C rows at once (255 registers and spills at n = 16).
    # Slots: 0 the adjoint after the current tile, 1 dA, 2 dB and 3 dC (time-invariant B/C).
    slot = dim * N
    carry = p_carry + (i_b * n_chunks + i_c).to(tl.int64) * 4 * slot + o_d * N  # (BLOCK_D,) pointers
    tl.store(carry[:, None] + o_n[None, :], g_after, mask=m_dn)
    for i_slot in tl.static_range(1, 4):
        tl.store(carry[:, None] + i_slot * slot + o_n[None, :], zeros, mask=m_dn)
    tl.debug_barrier()  # the tiles' rows are read back by other lanes than wrote them
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row = _rows(i_b, o_d, stride_xb, stride_xd)
    z_row = _rows(i_b, o_d, stride_zb, stride_zd)
    dy_row = _rows(i_b, o_d, stride_dyb, stride_dyd)
    p_chunks = p_states + (i_b * dim + o_d).to(tl.int64) * n_saved * N  # (BLOCK_D,) pointers
    first_tile = i_c * (CHUNK // BLOCK_L)
    n_tiles = tl.cdiv(tl.minimum((i_c + 1) * CHUNK, length), BLOCK_L) - first_tile
    for i_rev in range(0, n_tiles):
        i_t = first_tile + n_tiles - 1 - i_rev  # tile (and saved-state chunk) index in the sequence
        o_t = i_t * BLOCK_L + o_l
        m_t = o_t < length
        offs, m, u, delta, delta_raw, drive, reset, dy = _backward_tile_inputs(
            p_u, p_delta, p_z, p_ypre, p_dy, p_dz, p_seq, bias, row, z_row, dy_row, m_d, o_t, i_b, length,
            stride_xl, stride_zl, stride_dyl, HAS_Z, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        # The adjoint's inputs in descending time (suffix _rev), so that its reverse scan is a
        # forward scan; only its result g is flipped back.
        o_rev = i_t * BLOCK_L + BLOCK_L - 1 - o_l
        delta_next_rev, reset_next_rev = _next_decay_inputs(p_delta, p_seq, bias, row, m_d, o_t, o_rev, i_b, length,
                                                            stride_xl, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        dy_rev = tl.flip(dy, 1)
        ddelta = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        du = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for i_n in tl.range(0, N, num_stages=STAGES):  # STAGES > 1 prefetches B, C and the carries
            if i_t > 0:
                h_start = tl.load(p_chunks + (i_t - 1) * N + i_n, mask=m_d, other=0.0)
            elif HAS_H0:
                h_start = tl.load(p_h0 + (i_b * dim + o_d).to(tl.int64) * N + i_n, mask=m_d, other=0.0).to(tl.float32)
            else:
                h_start = tl.zeros((BLOCK_D,), dtype=tl.float32)
            A_n = tl.load(p_A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32) * LOG2E
            a = tl.exp2(delta * A_n[:, None])
            a_next_rev = tl.exp2(delta_next_rev * A_n[:, None])
            if HAS_SEQ:
                a = tl.where(reset[None, :], 0.0, a)
                a_next_rev = tl.where(reset_next_rev[None, :], 0.0, a_next_rev)
            B_n = _projection(p_B, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, b_per_group, N, B_VARIABLE, B_GROUPED)
            C_rev = _projection_rev(p_C, i_b, i_n, o_d, o_t, o_rev, m_d, dim, length, c_per_group, N, C_VARIABLE,
                                    C_GROUPED)
            b = drive * B_n
            a_scan, b_scan = tl.associative_scan((a, b), axis=1, combine_fn=_combine)
            hs = b_scan + a_scan * h_start[:, None]  # recomputed states h_t
            decay_rev, c_scan_rev = tl.associative_scan((a_next_rev, C_rev * dy_rev), axis=1, combine_fn=_combine)
            g_rev = c_scan_rev + decay_rev * tl.load(carry + i_n, mask=m_d, other=0.0)[:, None]
            tl.store(carry + i_n, _column(g_rev, o_l, BLOCK_L - 1), mask=m_d)
            g = tl.flip(g_rev, 1)  # dL/dh_t

            g_decayed = g * (hs - b)  # g_t a_t h_{t-1} = dL/d(Delta_t A)
            gB = g * B_n
            ddelta += gB * u + g_decayed * (A_n / LOG2E)[:, None]
            du += gB
            _accumulate(carry + slot + i_n, tl.sum(g_decayed * delta, axis=1), m_d)
            if B_VARIABLE:
                _add_projection_grad(p_dB, g * drive, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, b_per_group, N,
                                     B_GROUPED)
            else:
                _accumulate(carry + 2 * slot + i_n, tl.sum(g * drive, axis=1), m_d)
            if C_VARIABLE:
                _add_projection_grad(p_dC, hs * dy, i_b, i_n, o_d, o_t, m_d, m_t, dim, length, c_per_group, N,
                                     C_GROUPED)
            else:
                _accumulate(carry + 3 * slot + i_n, tl.sum(hs * dy, axis=1), m_d)
        dD_acc, dbias_acc = _backward_tile_outputs(p_D, p_du, p_ddelta, du, ddelta, u, delta, delta_raw, dy, offs, m,
                                                   o_d, m_d, dD_acc, dbias_acc, HAS_D, HAS_BIAS, SOFTPLUS)

    tl.debug_barrier()
    if HAS_H0:
        if i_c == 0:  # dL/dh_{-1} = a_0 g_0 (the first token never starts a new sequence)
            delta0, _ = _delta(p_delta, row[:, None], m_d[:, None], bias, HAS_BIAS, SOFTPLUS)
            A = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32) * LOG2E
            g_first = tl.load(carry[:, None] + o_n[None, :], mask=m_dn, other=0.0)
            tl.store(p_dh0 + o_state, tl.exp2(delta0 * A) * g_first, mask=m_dn)
    # Relaxed atomics throughout: plain sums read by later kernels (the default, acq_rel, puts a
    # MEMBAR.GPU before each).
    o_param = o_d[:, None] * N + o_n[None, :]
    _flush_slot(p_dA, carry[:, None] + slot + o_n[None, :], o_param, m_dn)
    if not B_VARIABLE:
        _flush_slot(p_dB, carry[:, None] + 2 * slot + o_n[None, :], o_param, m_dn)
    if not C_VARIABLE:
        _flush_slot(p_dC, carry[:, None] + 3 * slot + o_n[None, :], o_param, m_dn)
    if HAS_D:
        tl.atomic_add(p_dD + o_d, dD_acc, mask=m_d, sem="relaxed")
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, dbias_acc, mask=m_d, sem="relaxed")


@triton.jit
def selective_scan_chunk_adjoint_kernel(
    p_delta, p_A, p_C, p_z, p_bias, p_seq, p_dy, p_chunk_g, p_chunk_decay,
    dim, length, c_per_group, n_chunks,
    stride_xb, stride_xd, stride_xl, stride_zb, stride_zd, stride_zl, stride_dyb, stride_dyd, stride_dyl,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr,
    C_VARIABLE: tl.constexpr, C_GROUPED: tl.constexpr,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
):
    """First pass of a backward split over time, for chunks 1 .. n_chunks - 1 (program i_c + 1):
    the adjoint dL/dh at the chunk's first token when none enters from its right (g_k), and the
    product of the decays a_{t+1} over its tokens (decay_k), both (b, n_chunks, d, n) fp32, so
    that the adjoint at its first token is g_k + decay_k (the adjoint at the next chunk's first
    token)."""
    i_d, i_b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2) + 1
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    o_n = tl.arange(0, NP)
    o_l = tl.arange(0, BLOCK_L)
    m_d = o_d < dim
    bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None] if HAS_BIAS else None
    g = _load_columns(p_A, o_d, m_d, N, NP) * 0.0
    decay = g + 1.0
    row = _rows(i_b, o_d, stride_xb, stride_xd)
    z_row = _rows(i_b, o_d, stride_zb, stride_zd)
    dy_row = _rows(i_b, o_d, stride_dyb, stride_dyd)
    first_tile = i_c * (CHUNK // BLOCK_L)
    n_tiles = tl.cdiv(tl.minimum((i_c + 1) * CHUNK, length), BLOCK_L) - first_tile
    for i_rev in range(0, n_tiles):
        o_t = (first_tile + n_tiles - 1 - i_rev) * BLOCK_L + o_l
        o_rev = (first_tile + n_tiles - 1 - i_rev) * BLOCK_L + BLOCK_L - 1 - o_l  # descending time
        delta_next, reset_next = _next_decay_inputs(p_delta, p_seq, bias, row, m_d, o_t, o_rev, i_b, length,
                                                    stride_xl, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        m = m_d[:, None] & (o_t < length)[None, :]
        dy = tl.load(p_dy + _at(dy_row, o_t, stride_dyl), mask=m, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(p_z + _at(z_row, o_t, stride_zl), mask=m, other=0.0).to(tl.float32)
            dy = dy * zv * tl.sigmoid(zv)
        dy = tl.flip(dy, 1)
        for i_n in tl.static_range(N):
            A_n = tl.load(p_A + o_d * N + i_n, mask=m_d, other=0.0).to(tl.float32) * LOG2E
            a_next = tl.exp2(delta_next * A_n[:, None])
            if HAS_SEQ:
                a_next = tl.where(reset_next[None, :], 0.0, a_next)
            C_n = _projection_rev(p_C, i_b, i_n, o_d, o_t, o_rev, m_d, dim, length, c_per_group, N, C_VARIABLE,
                                  C_GROUPED)
            q, c_scan = tl.associative_scan((a_next, C_n * dy), axis=1, combine_fn=_combine)
            # The tile's last column is its first token: the maps composed over the whole tile.
            g = _set_column(g, o_n, i_n, _column(c_scan, o_l, BLOCK_L - 1)
                            + _column(q, o_l, BLOCK_L - 1) * _column(g, o_n, i_n))
            decay = _set_column(decay, o_n, i_n, _column(decay, o_n, i_n) * _column(q, o_l, BLOCK_L - 1))
    rows = ((i_b * n_chunks + i_c) * dim + o_d).to(tl.int64) * N
    for i_n in tl.static_range(N):
        tl.store(p_chunk_g + rows + i_n, _column(g, o_n, i_n), mask=m_d)
        tl.store(p_chunk_decay + rows + i_n, _column(decay, o_n, i_n), mask=m_d)


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
    h = tl.exp2(delta[:, None] * A * LOG2E) * h + (delta * u)[:, None] * Bv
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
