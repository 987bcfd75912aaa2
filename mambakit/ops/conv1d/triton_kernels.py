"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

Shape (b, d, l) with any strides: the launchers pass the time-contiguous layout (stride (d l, l, 1))
and the channel-last one (memory (b, l, d), the view ``x.transpose(1, 2)`` of a (b, l, d) tensor,
possibly a column slice of a wider one); the tile shape is chosen per layout so that its
contiguous axis is the long one. One program per (time tile, channel block, batch row). The filter
width W is small (2-4 in every Mamba), so the W shifted loads of a tile hit the cache.
Packed sequences arrive as sequence starts (b, l) int32: for each token the position where its
packed sequence begins, a large negative number for a row's first sequence (which also owns the
initial state). An input counts for an output when its position is at or after the output's start,
a comparison of positions with no segment loads per shifted tile.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _input_at(p_x_t, p_init_t, first_tile, o_t, m_d, start_out, length, stride_xl, SHIFT: tl.constexpr,
              W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x at positions o_t + SHIFT, fp32 (BLOCK_D, BLOCK_L), from the pointers p_x_t of x at o_t (and
    p_init_t of the initial state (b, d, W - 1) at o_t + W - 1, which negative positions read: in the
    first time tile only, first_tile). With segments an input before start_out (BLOCK_L,), the start
    of the output's sequence, counts as zero.
    Shifting one pointer tile by a scalar keeps a single address per element live across the shifted
    loads (offsets recomputed per shift cost registers, and occupancy with them)."""
    o_p = o_t + SHIFT
    m_x = (o_p >= 0) & (o_p < length)
    if HAS_SEQ:
        m_x = m_x & (o_p >= start_out)
    v = tl.load(p_x_t + SHIFT * stride_xl, mask=m_d[:, None] & m_x[None, :], other=0.0).to(tl.float32)
    if HAS_INIT and SHIFT < 0:
        if first_tile:  # the state (contiguous over time, unlike x) is read by the first tile only
            m_init = (o_p < 0) & (o_p >= -(W - 1))
            if HAS_SEQ:
                m_init = m_init & (o_p >= start_out)
            v += tl.load(p_init_t + SHIFT, mask=m_d[:, None] & m_init[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _pre_activation(p_x_t, p_w, p_bias, p_init_t, first_tile, o_d, o_t, m_d, start_out, length, stride_xl,
                    SHIFT: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                    HAS_SEQ: tl.constexpr):
    """bias + sum_k weight[:, k] x_{t-(W-1)+k} at t = o_t + SHIFT, (BLOCK_D, BLOCK_L) fp32."""
    acc = tl.zeros((o_d.shape[0], o_t.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        w_k = tl.load(p_w + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
        acc += w_k[:, None] * _input_at(p_x_t, p_init_t, first_tile, o_t, m_d, start_out, length, stride_xl,
                                        SHIFT - (W - 1) + k, W, HAS_INIT, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def _init_pointers(p_init, i_b, o_d, o_t, dim, W: tl.constexpr):
    """Pointers of the initial state (b, d, W - 1) at positions o_t + W - 1, (BLOCK_D, BLOCK_L)."""
    return p_init + (i_b * dim + o_d[:, None]) * (W - 1) + (o_t + W - 1)[None, :]


@triton.jit
def _offsets(o_d, o_t, stride_d, stride_t):
    """(BLOCK_D, BLOCK_L) int64 element offsets of channels o_d at times o_t within one batch row:
    a channel-last row of l x D elements passes 2^31 at l = 2^20 already."""
    return o_d[:, None].to(tl.int64) * stride_d + o_t[None, :].to(tl.int64) * stride_t


@triton.jit
def conv1d_fwd_kernel(p_x, p_w, p_bias, p_init, p_start, p_y, dim, length,
                      stride_xb, stride_xd, stride_xl, stride_yb, stride_yd, stride_yl,
                      W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                      SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    i_l, i_d = tl.program_id(0), tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # batch offsets may pass 2^31 elements
    o_t = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_t, m_d = o_t < length, o_d < dim
    start_t = tl.load(p_start + i_b * length + o_t, mask=m_t, other=0) if HAS_SEQ else o_t
    p_x_t = p_x + i_b * stride_xb + _offsets(o_d, o_t, stride_xd, stride_xl)
    p_init_t = _init_pointers(p_init, i_b, o_d, o_t, dim, W) if HAS_INIT else p_init
    y = _pre_activation(p_x_t, p_w, p_bias, p_init_t, i_l == 0, o_d, o_t, m_d, start_t, length, stride_xl, 0,
                        W, HAS_BIAS, HAS_INIT, HAS_SEQ)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(p_y + i_b * stride_yb + _offsets(o_d, o_t, stride_yd, stride_yl),
             y.to(p_y.dtype.element_ty), mask=m_d[:, None] & m_t[None, :])


@triton.jit
def _pick(q: tl.constexpr, xm3, xm2, xm1, x0, xp1, xp2, xp3):
    """The tile of x at shift q in [-3, 3] among the preloaded ones (a compile-time choice)."""
    if q == -3:
        return xm3
    elif q == -2:
        return xm2
    elif q == -1:
        return xm1
    elif q == 0:
        return x0
    elif q == 1:
        return xp1
    elif q == 2:
        return xp2
    else:
        return xp3


@triton.jit
def _shifted_input(p_x_s, p_init_s, first_tile, o_s, m_d, start_t, length, stride_xl, q: tl.constexpr,
                   xm3, xm2, xm1, x0, xp1, xp2, xp3, W: tl.constexpr, HAS_INIT: tl.constexpr,
                   HAS_SEQ: tl.constexpr):
    """x at o_s + q for an output whose sequence starts at start_t, fp32 (BLOCK_D, BLOCK_L): a
    preloaded tile (masked here) when W <= 4, else loaded."""
    if W <= 4:
        v = _pick(q, xm3, xm2, xm1, x0, xp1, xp2, xp3)
        if HAS_SEQ:
            v = tl.where((o_s + q >= start_t)[None, :], v, 0.0)
    else:
        v = _input_at(p_x_s, p_init_s, first_tile, o_s, m_d, start_t, length, stride_xl, q, W, HAS_INIT, HAS_SEQ)
    return v


@triton.jit
def _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, q: tl.constexpr, W: tl.constexpr,
               HAS_INIT: tl.constexpr):
    """x at o_s + q without the packed-sequence mask, for the W <= 4 preloads (0.0 if unused)."""
    if (W <= 4) & (q > -W) & (q < W):
        v = _input_at(p_x_s, p_init_s, first_tile, o_s, m_d, o_s, length, stride_xl, q, W, HAS_INIT, False)
    else:
        v = 0.0
    return v


@triton.jit
def conv1d_bwd_kernel(p_x, p_w, p_bias, p_init, p_start, p_dy, p_dx, p_dw, p_dbias, dim, length, tiles_per_program,
                      stride_xb, stride_xd, stride_xl, stride_dyb, stride_dyd, stride_dyl,
                      stride_dxb, stride_dxd, stride_dxl,
                      W: tl.constexpr, WP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                      HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx_s = sum_k weight[:, k] g_{s+(W-1)-k} with g = dL/d(pre-activation) recomputed at the W
    shifted positions. For W <= 4 (every Mamba) the 2 W - 1 shifted tiles of x are loaded once
    per tile and shared by the W pre-activations and the weight gradient (W^2 + W loads before).
    A program walks ``tiles_per_program`` consecutive time tiles and keeps its dweight and dbias
    partial sums in registers (fp32), added atomically once at the end (one atomic per tile made
    every weight address take b l / BLOCK_L contended adds)."""
    i_c, i_d = tl.program_id(0), tl.program_id(1)
    i_b = tl.program_id(2).to(tl.int64)  # batch offsets may pass 2^31 elements
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    o_w = tl.arange(0, WP)
    dw_acc = tl.zeros((BLOCK_D, WP), dtype=tl.float32)
    # For W <= 4 the products g x_k (and g) are summed as whole tiles over the program's time tiles
    # and reduced over time once at the end: a reduction per tile crosses warps in the channel-last
    # tile (time spread over the warps) and cost more than the rest of the tile's work.
    gx0 = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    gx1 = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    gx2 = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    gx3 = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    g_sum = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    first = i_c * tiles_per_program
    last = tl.minimum(first + tiles_per_program, tl.cdiv(length, BLOCK_L))
    for i_l in range(first, last):
        first_tile = i_l == 0
        o_s = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
        m_s = o_s < length
        p_x_s = p_x + i_b * stride_xb + _offsets(o_d, o_s, stride_xd, stride_xl)
        p_dy_s = p_dy + i_b * stride_dyb + _offsets(o_d, o_s, stride_dyd, stride_dyl)
        p_init_s = _init_pointers(p_init, i_b, o_d, o_s, dim, W) if HAS_INIT else p_init
        xm3 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, -3, W, HAS_INIT)
        xm2 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, -2, W, HAS_INIT)
        xm1 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, -1, W, HAS_INIT)
        x0 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, 0, W, HAS_INIT)
        xp1 = 0.0
        xp2 = 0.0
        xp3 = 0.0
        if SILU:  # the pre-activations of later outputs read later inputs
            xp1 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, 1, W, HAS_INIT)
            xp2 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, 2, W, HAS_INIT)
            xp3 = _raw_input(p_x_s, p_init_s, first_tile, o_s, m_d, length, stride_xl, 3, W, HAS_INIT)
        dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        for j in tl.static_range(W):
            o_t = o_s + j  # the outputs that read x_s, through weight[:, W - 1 - j]
            m_t = o_t < length
            start_t = tl.load(p_start + i_b * length + o_t, mask=m_t, other=0) if HAS_SEQ else o_t
            g = tl.load(p_dy_s + j * stride_dyl, mask=m_d[:, None] & m_t[None, :], other=0.0).to(tl.float32)
            if SILU:
                pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
                for k in tl.static_range(W):
                    w_k = tl.load(p_w + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
                    pre += w_k[:, None] * _shifted_input(p_x_s, p_init_s, first_tile, o_s, m_d, start_t, length,
                                                         stride_xl, j - (W - 1) + k, xm3, xm2, xm1, x0, xp1, xp2,
                                                         xp3, W, HAS_INIT, HAS_SEQ)
                if HAS_BIAS:
                    pre += bias[:, None]
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            if HAS_SEQ:
                g_for_s = tl.where((o_s >= start_t)[None, :], g, 0.0)  # x_s in output t's sequence
            else:
                g_for_s = g
            w_k = tl.load(p_w + o_d * W + (W - 1 - j), mask=m_d, other=0.0).to(tl.float32)
            dx += w_k[:, None] * g_for_s
            if j == 0:
                # This tile's own outputs: their weight and bias gradients.
                if HAS_BIAS:
                    g_sum += g
                for k in tl.static_range(W):
                    x_k = _shifted_input(p_x_s, p_init_s, first_tile, o_s, m_d, start_t, length, stride_xl,
                                         k - (W - 1), xm3, xm2, xm1, x0, xp1, xp2, xp3, W, HAS_INIT, HAS_SEQ)
                    if W > 4:
                        dw_acc += tl.where(o_w[None, :] == k, tl.sum(g * x_k, axis=1)[:, None], 0.0)
                    elif k == 0:
                        gx0 += g * x_k
                    elif k == 1:
                        gx1 += g * x_k
                    elif k == 2:
                        gx2 += g * x_k
                    else:
                        gx3 += g * x_k
        tl.store(p_dx + i_b * stride_dxb + _offsets(o_d, o_s, stride_dxd, stride_dxl),
                 dx.to(p_dx.dtype.element_ty), mask=m_d[:, None] & m_s[None, :])
    if W <= 4:
        dw_acc = tl.where(o_w[None, :] == 0, tl.sum(gx0, axis=1)[:, None], dw_acc)
        dw_acc = tl.where(o_w[None, :] == 1, tl.sum(gx1, axis=1)[:, None], dw_acc)
        dw_acc = tl.where(o_w[None, :] == 2, tl.sum(gx2, axis=1)[:, None], dw_acc)
        dw_acc = tl.where(o_w[None, :] == 3, tl.sum(gx3, axis=1)[:, None], dw_acc)
    if HAS_BIAS:
        tl.atomic_add(p_dbias + o_d, tl.sum(g_sum, axis=1), mask=m_d, sem="relaxed")
    tl.atomic_add(p_dw + o_d[:, None] * W + o_w[None, :], dw_acc, mask=m_d[:, None] & (o_w < W)[None, :],
                  sem="relaxed")


@triton.jit
def conv1d_update_kernel(p_x, p_state, p_w, p_bias, p_y, dim,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr):
    """One token: y = act(bias + weight . [state, x]); the state shifts left and takes x, in place."""
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    x = tl.load(p_x + i_b * dim + o_d, mask=m_d, other=0.0).to(tl.float32)
    y = tl.load(p_w + o_d * W + (W - 1), mask=m_d, other=0.0).to(tl.float32) * x
    o_state = (i_b * dim + o_d) * (W - 1)
    for k in tl.static_range(W - 1):
        s_k = tl.load(p_state + o_state + k, mask=m_d, other=0.0).to(tl.float32)
        y += tl.load(p_w + o_d * W + k, mask=m_d, other=0.0).to(tl.float32) * s_k
        if k > 0:
            tl.store(p_state + o_state + k - 1, s_k.to(p_state.dtype.element_ty), mask=m_d)
    if W > 1:
        tl.store(p_state + o_state + W - 2, x.to(p_state.dtype.element_ty), mask=m_d)
    if HAS_BIAS:
        y += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(p_y + i_b * dim + o_d, y.to(p_y.dtype.element_ty), mask=m_d)
