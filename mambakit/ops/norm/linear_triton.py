"""Triton path of :func:`mambakit.ops.norm.linear.gated_rms_norm_linear`: gated RMSNorm and the
projection after it, one kernel, for a few rows (decode tokens).

Program (i_n, i_r) takes BLOCK_N output features of rows [i_r ROWS, (i_r + 1) ROWS). With one
norm group its weight tile (BLOCK_N, BLOCK_G >= d) stays in registers for all its rows; with
several groups each group's tile is loaded per row (from L2 after the first row). A row's group
is loaded whole, its mean square reduced, and the normed values (rounded to the activation dtype,
as the unfused norm stores them) multiplied into the tile.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import cdiv, interpreting, next_power_of_2, sm_count

# Rows per program: the weight tile is read once for these, and each further row costs a
# dependent chain of loads and reductions, so large batches split into row blocks.
ROWS_PER_PROGRAM = 4
# Weight-tile values per program (BLOCK_N x BLOCK_G), held in registers as float32.
TILE_ELEMENTS = 8192


@triton.jit
def gated_norm_linear_kernel(p_x, p_z, p_nw, p_w, p_bias, p_out, rows, n_out, group_size, eps,
                             stride_x, stride_z, stride_w, rows_per_program,
                             N_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out (rows, n_out) = (rms_group(x * silu(z)) * nw) @ w^T [+ bias]; grid (n_out tiles, row blocks)."""
    i_n, i_r = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_g = tl.arange(0, BLOCK_G)
    m_n, m_g = o_n < n_out, o_g < group_size
    m_ng = m_n[:, None] & m_g[None, :]
    p_w_rows = p_w + o_n.to(tl.int64)[:, None] * stride_w
    b_w = tl.zeros((BLOCK_N, BLOCK_G), dtype=tl.float32)
    b_nw = tl.zeros((BLOCK_G,), dtype=tl.float32)
    if N_GROUPS == 1:
        b_w = tl.load(p_w_rows + o_g[None, :], mask=m_ng, other=0.0).to(tl.float32)
        b_nw = tl.load(p_nw + o_g, mask=m_g, other=0.0).to(tl.float32)
    b_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)
    first = i_r * rows_per_program
    for r in range(first, tl.minimum(rows, first + rows_per_program)):
        acc = b_bias
        for g in tl.static_range(N_GROUPS):
            o_c = g * group_size + o_g
            b_x = tl.load(p_x + r * stride_x + o_c, mask=m_g, other=0.0).to(tl.float32)
            b_z = tl.load(p_z + r * stride_z + o_c, mask=m_g, other=0.0).to(tl.float32)
            b_s = b_x * (b_z * tl.sigmoid(b_z))
            b_rstd = 1.0 / tl.sqrt(tl.sum(b_s * b_s, axis=0) / group_size + eps)
            if N_GROUPS > 1:
                b_w = tl.load(p_w_rows + o_c[None, :], mask=m_ng, other=0.0).to(tl.float32)
                b_nw = tl.load(p_nw + o_c, mask=m_g, other=0.0).to(tl.float32)
            b_v = (b_s * b_rstd * b_nw).to(p_x.dtype.element_ty).to(tl.float32)
            acc += tl.sum(b_w * b_v[None, :], axis=1)
        tl.store(p_out + r * n_out + o_n, acc.to(p_out.dtype.element_ty), mask=m_n)


def _tile(rows: int, n_out: int, group_size: int, device: torch.device) -> dict:
    """BLOCK_G covers a group; BLOCK_N as wide as TILE_ELEMENTS allows while the grid still fills
    every SM once (under the interpreter: at most 4 features, so CI runs several tiles)."""
    block_g = next_power_of_2(group_size)
    block_n = max(1, TILE_ELEMENTS // block_g)
    row_blocks = cdiv(rows, ROWS_PER_PROGRAM)
    if interpreting() or device.type != "cuda":
        block_n = min(block_n, 4)
    else:
        while block_n > 1 and cdiv(n_out, block_n) * row_blocks < sm_count(device.index):
            block_n //= 2
    num_warps = 8 if block_n * block_g >= 8192 else 4
    return dict(BLOCK_N=block_n, BLOCK_G=block_g, num_warps=num_warps)


@torch.library.custom_op("mambakit::gated_rms_norm_linear", mutates_args=())
def gated_rms_norm_linear_op(x: Tensor, z: Tensor, norm_weight: Tensor, weight: Tensor, bias: Optional[Tensor],
                             eps: float, group_size: int) -> Tensor:
    """x, z (b, d) channels at unit stride; parameters contiguous -> (b, n_out) in x's dtype."""
    rows, d = x.shape
    n_out = weight.shape[0]
    out = torch.empty(rows, n_out, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    tile = _tile(rows, n_out, group_size, x.device)
    grid = (cdiv(n_out, tile["BLOCK_N"]), cdiv(rows, ROWS_PER_PROGRAM))
    gated_norm_linear_kernel[grid](
        x, z, norm_weight, weight, bias, out, rows, n_out, group_size, eps,
        x.stride(0), z.stride(0), weight.stride(0), ROWS_PER_PROGRAM,
        N_GROUPS=d // group_size, HAS_BIAS=bias is not None, **tile)
    return out


@gated_rms_norm_linear_op.register_fake
def _(x, z, norm_weight, weight, bias, eps, group_size):
    return torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)


def gated_rms_norm_linear_triton(x, z, norm_weight, weight, bias, eps, group_size):
    """Triton path of :func:`gated_rms_norm_linear` (inputs validated and supported)."""
    def unit_channels(t):
        return t if t.stride(1) == 1 else t.contiguous()

    return gated_rms_norm_linear_op(unit_channels(x), unit_channels(z), norm_weight.contiguous(), weight.contiguous(),
                                    None if bias is None else bias.contiguous(), float(eps), group_size)
