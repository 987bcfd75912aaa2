"""Triton kernels of the causal depthwise conv1d: forward, backward and the one-token update.

Layout (b, d, l), time contiguous; one program per (time tile, channel block, batch row). The
filter width W is small (2-4 in every Mamba), so the W shifted loads of a tile hit the cache.
Packed sequences arrive as canonical segment ids (b, l) (the count of id changes so far); an input
counts for an output only inside the same segment, and the initial state belongs to segment 0.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _input_at(p_x, p_init, p_seg, i_b, o_d, o_p, m_d, seg_out, dim, length,
              W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """x at positions o_p (BLOCK_L,) for channels o_d, fp32 (BLOCK_D, BLOCK_L): negative positions
    read the initial state, and with segments an input from another segment than the output's
    (seg_out, (BLOCK_L,)) counts as zero."""
    inside = (o_p >= 0) & (o_p < length)
    v = tl.load(p_x + (i_b * dim + o_d[:, None]) * length + o_p[None, :],
                mask=m_d[:, None] & inside[None, :], other=0.0).to(tl.float32)
    if HAS_INIT:
        before = (o_p < 0) & (o_p >= -(W - 1))
        v += tl.load(p_init + (i_b * dim + o_d[:, None]) * (W - 1) + (o_p + W - 1)[None, :],
                     mask=m_d[:, None] & before[None, :], other=0.0).to(tl.float32)
    if HAS_SEQ:
        seg_in = tl.load(p_seg + i_b * length + o_p, mask=inside, other=0)  # before x_0: segment 0
        v = tl.where((seg_in == seg_out)[None, :], v, 0.0)
    return v


@triton.jit
def _pre_activation(p_x, p_w, p_bias, p_init, p_seg, i_b, o_d, o_t, m_d, seg_out, dim, length,
                    W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """bias + sum_k weight[:, k] x_{t-(W-1)+k}, (BLOCK_D, BLOCK_L) fp32."""
    acc = tl.zeros((o_d.shape[0], o_t.shape[0]), dtype=tl.float32)
    for k in tl.static_range(W):
        w_k = tl.load(p_w + o_d * W + k, mask=m_d, other=0.0).to(tl.float32)
        acc += w_k[:, None] * _input_at(p_x, p_init, p_seg, i_b, o_d, o_t - (W - 1) + k, m_d, seg_out, dim, length,
                                        W, HAS_INIT, HAS_SEQ)
    if HAS_BIAS:
        acc += tl.load(p_bias + o_d, mask=m_d, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def conv1d_fwd_kernel(p_x, p_w, p_bias, p_init, p_seg, p_y, dim, length,
                      W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                      SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    i_l, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_t, m_d = o_t < length, o_d < dim
    seg_out = tl.load(p_seg + i_b * length + o_t, mask=m_t, other=0) if HAS_SEQ else o_t
    y = _pre_activation(p_x, p_w, p_bias, p_init, p_seg, i_b, o_d, o_t, m_d, seg_out, dim, length,
                        W, HAS_BIAS, HAS_INIT, HAS_SEQ)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(p_y + (i_b * dim + o_d[:, None]) * length + o_t[None, :], y.to(p_y.dtype.element_ty),
             mask=m_d[:, None] & m_t[None, :])


@triton.jit
def conv1d_bwd_kernel(p_x, p_w, p_bias, p_init, p_seg, p_dy, p_dx, p_dw, p_dbias, dim, length,
                      W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                      SILU: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dx_s = sum_k weight[:, k] g_{s+(W-1)-k} with g = dL/d(pre-activation) recomputed at the W
    shifted positions; dweight and dbias are reduced over the tile and added atomically."""
    i_l, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_s = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_s, m_d = o_s < length, o_d < dim
    seg_s = tl.load(p_seg + i_b * length + o_s, mask=m_s, other=0) if HAS_SEQ else o_s
    dx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(W):
        o_t = o_s + j  # the outputs that read x_s, through weight[:, W - 1 - j]
        m_t = o_t < length
        seg_t = tl.load(p_seg + i_b * length + o_t, mask=m_t, other=0) if HAS_SEQ else o_t
        g = tl.load(p_dy + (i_b * dim + o_d[:, None]) * length + o_t[None, :],
                    mask=m_d[:, None] & m_t[None, :], other=0.0).to(tl.float32)
        if SILU:
            pre = _pre_activation(p_x, p_w, p_bias, p_init, p_seg, i_b, o_d, o_t, m_d, seg_t, dim, length,
                                  W, HAS_BIAS, HAS_INIT, HAS_SEQ)
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        if HAS_SEQ:
            g_for_s = tl.where((seg_t == seg_s)[None, :], g, 0.0)
        else:
            g_for_s = g
        w_k = tl.load(p_w + o_d * W + (W - 1 - j), mask=m_d, other=0.0).to(tl.float32)
        dx += w_k[:, None] * g_for_s
        if j == 0:
            # This tile's own outputs: their weight and bias gradients.
            if HAS_BIAS:
                tl.atomic_add(p_dbias + o_d, tl.sum(g, axis=1), mask=m_d)
            for k in tl.static_range(W):
                x_k = _input_at(p_x, p_init, p_seg, i_b, o_d, o_t - (W - 1) + k, m_d, seg_t, dim, length,
                                W, HAS_INIT, HAS_SEQ)
                tl.atomic_add(p_dw + o_d * W + k, tl.sum(g * x_k, axis=1), mask=m_d)
    tl.store(p_dx + (i_b * dim + o_d[:, None]) * length + o_s[None, :], dx.to(p_dx.dtype.element_ty),
             mask=m_d[:, None] & m_s[None, :])


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
