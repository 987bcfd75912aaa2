"""Triton path of :func:`mambakit.ops.selective_scan.mixer_step.mamba1_mixer_step`: one decode
token of the Mamba-1 mixer in two kernels.

x_proj reduces over all d channels, so the token needs one grid-wide barrier, the boundary
between the kernels. The first (programs over channel chunks and batch rows) updates the conv
state in place, keeps the conv output x_c in a float32 scratch row and writes its chunk's partial
x_proj product; the second (programs over channel blocks and rows) sums the partials of its row
(dt_low, B and C each loaded straight from the partials at their offsets), then runs dt_proj for
its channels, the state update in place and the gated output.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import cdiv, interpreting, next_power_of_2, sm_count
from .triton_kernels import LOG2E, _softplus

F32 = torch.float32
BLOCK_D = 32  # channels per program of the second kernel, and per inner step of the first
# The first kernel's programs take CHUNK_D = BLOCK_D channels while that still leaves fewer
# than this many programs per SM, else 4 BLOCK_D: the second kernel reads every partial of its
# row, d / CHUNK_D of them, so wide chunks keep that traffic small at large batch.
_NARROW_CHUNK_PROGRAMS_PER_SM = 4


@triton.jit
def mixer_step_project_kernel(
    p_x, p_conv_state, p_conv_w, p_conv_b, p_wx, p_xc, p_part,
    dim, n_proj, stride_xb, n_chunks,
    W: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, RP: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr,
):
    """Program (i_c, i_b): channels [i_c CHUNK_D, (i_c + 1) CHUNK_D) of row i_b. Conv + SiLU of
    the token (the conv state shifts left and takes x, in place), x_c to the scratch row, and
    x_proj_weight[:, chunk] @ x_c[chunk] (n_proj values) to partials (b, n_chunks, n_proj)."""
    i_c, i_b = tl.program_id(0), tl.program_id(1)
    o_r = tl.arange(0, RP)
    m_r = o_r < n_proj
    acc = tl.zeros((RP,), dtype=tl.float32)
    for j in tl.static_range(CHUNK_D // BLOCK_D):
        o_d = i_c * CHUNK_D + j * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < dim
        x = tl.load(p_x + i_b * stride_xb + o_d, mask=m_d, other=0.0).to(tl.float32)
        xc = tl.load(p_conv_w + o_d * W + (W - 1), mask=m_d, other=0.0).to(tl.float32) * x
        o_state = (i_b * dim + o_d).to(tl.int64) * (W - 1)
        for k in tl.static_range(W - 1):
            s_k = tl.load(p_conv_state + o_state + k, mask=m_d, other=0.0)
            xc += tl.load(p_conv_w + o_d * W + k, mask=m_d, other=0.0).to(tl.float32) * s_k.to(tl.float32)
            if k > 0:
                tl.store(p_conv_state + o_state + k - 1, s_k, mask=m_d)
        if W > 1:
            tl.store(p_conv_state + o_state + W - 2, x.to(p_conv_state.dtype.element_ty), mask=m_d)
        if HAS_CONV_BIAS:
            xc += tl.load(p_conv_b + o_d, mask=m_d, other=0.0).to(tl.float32)
        xc = tl.where(m_d, xc * tl.sigmoid(xc), 0.0)
        tl.store(p_xc + i_b * dim + o_d, xc, mask=m_d)
        wx = tl.load(p_wx + o_r[:, None] * dim + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)
        acc += tl.sum(wx.to(tl.float32) * xc[None, :], axis=1)
    tl.store(p_part + (i_b * n_chunks + i_c) * n_proj + o_r, acc, mask=m_r)


@triton.jit
def _summed_partials(p_part_row, offset, size, n_chunks, n_proj, KP: tl.constexpr, SP: tl.constexpr):
    """Entries [offset, offset + size) of a row's x_proj output, summed over its n_chunks
    partials: a (SP,) fp32 vector, zero past ``size``."""
    o_k = tl.arange(0, KP)
    o_s = tl.arange(0, SP)
    mask = (o_k < n_chunks)[:, None] & (o_s < size)[None, :]
    parts = tl.load(p_part_row + o_k[:, None] * n_proj + offset + o_s[None, :], mask=mask, other=0.0)
    return tl.sum(parts, axis=0)


@triton.jit
def mixer_step_scan_kernel(
    p_z, p_wdt, p_dt_bias, p_A, p_D, p_state, p_xc, p_part, p_y,
    dim, dt_rank, n_proj, stride_zb, n_chunks,
    N: tl.constexpr, NP: tl.constexpr, RTP: tl.constexpr, KP: tl.constexpr, HAS_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i_d, i_b): channels [i_d BLOCK_D, (i_d + 1) BLOCK_D) of row i_b. dt, the state
    update (in place, fp32) and y = (<h, C> + D x_c) silu(z)."""
    i_d, i_b = tl.program_id(0), tl.program_id(1)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    o_n = tl.arange(0, NP)
    m_dn = m_d[:, None] & (o_n < N)[None, :]
    p_part_row = p_part + i_b * n_chunks * n_proj
    dt_low = _summed_partials(p_part_row, 0, dt_rank, n_chunks, n_proj, KP, RTP)  # (RTP,)
    Bv = _summed_partials(p_part_row, dt_rank, N, n_chunks, n_proj, KP, NP)  # (NP,)
    Cv = _summed_partials(p_part_row, dt_rank + N, N, n_chunks, n_proj, KP, NP)
    o_r = tl.arange(0, RTP)
    wdt = tl.load(p_wdt + o_d[:, None] * dt_rank + o_r[None, :], mask=m_d[:, None] & (o_r < dt_rank)[None, :],
                  other=0.0)
    dt = tl.sum(wdt.to(tl.float32) * dt_low[None, :], axis=1)
    dt = _softplus(dt + tl.load(p_dt_bias + o_d, mask=m_d, other=0.0).to(tl.float32))
    xc = tl.load(p_xc + i_b * dim + o_d, mask=m_d, other=0.0)
    A = tl.load(p_A + o_d[:, None] * N + o_n[None, :], mask=m_dn, other=0.0).to(tl.float32)
    o_state = (i_b * dim + o_d[:, None]).to(tl.int64) * N + o_n[None, :]
    h = tl.load(p_state + o_state, mask=m_dn, other=0.0)
    h = tl.exp2(dt[:, None] * A * LOG2E) * h + (dt * xc)[:, None] * Bv[None, :]
    tl.store(p_state + o_state, h, mask=m_dn)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += tl.load(p_D + o_d, mask=m_d, other=0.0).to(tl.float32) * xc
    zv = tl.load(p_z + i_b * stride_zb + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(p_y + i_b * dim + o_d, (y * zv * tl.sigmoid(zv)).to(p_y.dtype.element_ty), mask=m_d)


def chunk_width(batch: int, dim: int, device: torch.device) -> int:
    """Channels per program of the first kernel: BLOCK_D or 4 BLOCK_D on a GPU (see
    _NARROW_CHUNK_PROGRAMS_PER_SM); under the interpreter 2 BLOCK_D when d exceeds it, so that CI
    runs both a one-step and a looped chunk."""
    if interpreting() or device.type != "cuda":
        return 2 * BLOCK_D if dim > 2 * BLOCK_D else BLOCK_D
    narrow = cdiv(dim, BLOCK_D) * batch < _NARROW_CHUNK_PROGRAMS_PER_SM * sm_count(device.index)
    return BLOCK_D if narrow else 4 * BLOCK_D


@torch.library.custom_op("mambakit::mamba1_mixer_step", mutates_args=("conv_state", "ssm_state"))
def mamba1_mixer_step_op(x: Tensor, z: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                         x_proj_weight: Tensor, dt_proj_weight: Tensor, dt_bias: Tensor, A: Tensor,
                         D: Optional[Tensor], ssm_state: Tensor) -> Tensor:
    """x, z (b, d) channels at unit stride, states contiguous (ssm_state fp32), parameters
    contiguous -> y (b, d) contiguous in x's dtype; the states are updated in place."""
    b, d = x.shape
    n, r, n_proj = A.shape[1], dt_proj_weight.shape[1], x_proj_weight.shape[0]
    chunk = chunk_width(b, d, x.device)
    n_chunks = cdiv(d, chunk)
    xc = torch.empty(b, d, device=x.device, dtype=F32)
    partials = torch.empty(b, n_chunks, n_proj, device=x.device, dtype=F32)
    y = torch.empty(b, d, device=x.device, dtype=x.dtype)
    mixer_step_project_kernel[(n_chunks, b)](
        x, conv_state, conv_weight, conv_bias, x_proj_weight, xc, partials, d, n_proj, x.stride(0), n_chunks,
        W=conv_weight.shape[1], HAS_CONV_BIAS=conv_bias is not None, RP=next_power_of_2(n_proj),
        BLOCK_D=BLOCK_D, CHUNK_D=chunk, num_warps=4)
    mixer_step_scan_kernel[(cdiv(d, BLOCK_D), b)](
        z, dt_proj_weight, dt_bias, A, D, ssm_state, xc, partials, y, d, r, n_proj, z.stride(0), n_chunks,
        N=n, NP=max(2, next_power_of_2(n)), RTP=max(2, next_power_of_2(r)),
        KP=max(2, next_power_of_2(n_chunks)), HAS_D=D is not None, BLOCK_D=BLOCK_D, num_warps=4)
    return y


@mamba1_mixer_step_op.register_fake
def _(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, ssm_state):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def mamba1_mixer_step_triton(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
                             ssm_state):
    """Triton path of :func:`mamba1_mixer_step` (inputs validated: kernel-ready states, x and z)."""
    def c(t):
        return None if t is None else t.contiguous()

    return mamba1_mixer_step_op(x, z, conv_state, c(conv_weight), c(conv_bias), c(x_proj_weight), c(dt_proj_weight),
                                c(dt_bias), c(A), c(D), ssm_state)
