"""Triton path of :func:`mambakit.ops.norm.linear.gated_rms_norm_linear`: gated RMSNorm and the
projection after it, one kernel, for a few rows (decode tokens).

Program (i_n, i_r) takes BLOCK_N output features of row i_r. For each norm group it loads the
weight tile (BLOCK_N, BLOCK_G >= group size) and the row's group whole, reduces the mean square,
and multiplies the normed values (rounded to the activation dtype, as the unfused norm stores
them) into the tile. Every program recomputes its row's norm, which is why the kernel pays only
for a few rows (see MAX_FUSED_ROW_VALUES in linear.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import cdiv, interpreting, next_power_of_2, sm_count

# Weight-tile values per program (BLOCK_N x BLOCK_G), held in registers as float32. One row per
# program: on an H200, 2, 4 or 8 rows a program (their loads unrolled) and tiles of 4096 or 8192
# values were at best 0.3 us faster (8192-value tiles at 2 rows of d 1536) and mostly slower, up
# to 2x (benchmarks/NOTES.md, "Mamba-2 decode: the output norm and out_proj in one kernel").
TILE_ELEMENTS = 16384


@triton.jit
def gated_norm_linear_kernel(p_x, p_z, p_nw, p_w, p_bias, p_out, n_out, group_size, eps, stride_x, stride_z, stride_w,
                             N_GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """out (rows, n_out) = (rms_group(x * silu(z)) * nw) @ w^T [+ bias]; grid (n_out tiles, rows)."""
    i_n, i_r = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_g = tl.arange(0, BLOCK_G)
    m_n, m_g = o_n < n_out, o_g < group_size
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        acc = tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)
    for g in tl.static_range(N_GROUPS):
        o_c = g * group_size + o_g
        b_w = tl.load(p_w + o_n.to(tl.int64)[:, None] * stride_w + o_c[None, :], mask=m_n[:, None] & m_g[None, :],
                      other=0.0).to(tl.float32)
        b_x = tl.load(p_x + i_r * stride_x + o_c, mask=m_g, other=0.0).to(tl.float32)
        b_z = tl.load(p_z + i_r * stride_z + o_c, mask=m_g, other=0.0).to(tl.float32)
        b_s = b_x * (b_z * tl.sigmoid(b_z))
        b_rstd = 1.0 / tl.sqrt(tl.sum(b_s * b_s, axis=0) / group_size + eps)
        b_nw = tl.load(p_nw + o_c, mask=m_g, other=0.0).to(tl.float32)
        b_v = (b_s * b_rstd * b_nw).to(p_x.dtype.element_ty).to(tl.float32)
        acc += tl.sum(b_w * b_v[None, :], axis=1)
    tl.store(p_out + i_r * n_out + o_n, acc.to(p_out.dtype.element_ty), mask=m_n)


def _tile(rows: int, n_out: int, group_size: int, device: torch.device) -> dict:
    """BLOCK_G covers a group; BLOCK_N as wide as TILE_ELEMENTS allows while the grid still fills
    every SM once (under the interpreter: at most 4 features, so CI runs several tiles)."""
    block_g = next_power_of_2(group_size)
    block_n = max(1, TILE_ELEMENTS // block_g)
    if interpreting() or device.type != "cuda":
        block_n = min(block_n, 4)
    else:
        while block_n > 1 and cdiv(n_out, block_n) * rows < sm_count(device.index):
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
    gated_norm_linear_kernel[(cdiv(n_out, tile["BLOCK_N"]), rows)](
        x, z, norm_weight, weight, bias, out, n_out, group_size, eps, x.stride(0), z.stride(0), weight.stride(0),
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
