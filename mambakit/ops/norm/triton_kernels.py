"""Triton kernels of the gated, grouped RMSNorm (plain RMSNorm is the case without z, one group)
and of the residual add + RMSNorm / LayerNorm that opens every block.

Rows are the leading axes of x (..., d) seen as (outer, inner) with one stride each, so a column
slice of a wider (b, l, D) tensor (the gate z of Mamba-2 is one) is read in place; channels are
unit-stride. One program holds a tile of BLOCK_M rows of one group (BLOCK_G >= group_size
channels); statistics, gate and weight run in fp32 and only the outputs round to the storage dtype.
The backward recomputes the per-row rstd from x and z (cheaper than saving and reloading it), and
each program walks a strided set of row tiles so that its weight gradient is summed in registers
and written once to its own row of a (programs, d) buffer, reduced afterwards.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_offsets(o_m, inner, stride_outer, stride_inner):
    """Memory offsets (BLOCK_M,) of rows o_m of a (outer, inner, d) view."""
    return (o_m // inner).to(tl.int64) * stride_outer + (o_m % inner).to(tl.int64) * stride_inner


@triton.jit
def _normalize(b_x, b_z, m_m, group_size, eps, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """-> (xhat, rstd): the normalised (gated first unless NORM_BEFORE_GATE) input [BLOCK_M, BLOCK_G]
    and 1 / rms per row [BLOCK_M], zero on rows past the end (no NaN from rsqrt(0) with eps = 0)."""
    if HAS_Z and not NORM_BEFORE_GATE:
        b_s = b_x * (b_z * tl.sigmoid(b_z))
    else:
        b_s = b_x
    b_mean_square = tl.where(m_m, tl.sum(b_s * b_s, axis=1) / group_size + eps, 1.0)
    b_rstd = tl.where(m_m, 1.0 / tl.sqrt(b_mean_square), 0.0)
    return b_s * b_rstd[:, None], b_rstd


@triton.jit
def gated_rms_norm_fwd_kernel(p_x, p_z, p_w, p_y, rows, inner, dim, group_size, eps,
                              stride_x_outer, stride_x_inner, stride_z_outer, stride_z_inner,
                              HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """y (rows, d) contiguous = rms_group(x [* silu(z)]) * weight [* silu(z)]; grid (row tiles x groups,),
    the group fastest so that programs running together cover whole rows."""
    n_groups = dim // group_size
    i_m, i_g = tl.program_id(0) // n_groups, tl.program_id(0) % n_groups
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_c = i_g * group_size + tl.arange(0, BLOCK_G)
    m_m, m_c = o_m < rows, tl.arange(0, BLOCK_G) < group_size
    m_mc = m_m[:, None] & m_c[None, :]
    b_x = tl.load(p_x + _row_offsets(o_m, inner, stride_x_outer, stride_x_inner)[:, None] + o_c[None, :],
                  mask=m_mc, other=0.0).to(tl.float32)
    b_z = b_x
    if HAS_Z:
        b_z = tl.load(p_z + _row_offsets(o_m, inner, stride_z_outer, stride_z_inner)[:, None] + o_c[None, :],
                      mask=m_mc, other=0.0).to(tl.float32)
    b_xhat, _ = _normalize(b_x, b_z, m_m, group_size, eps, HAS_Z, NORM_BEFORE_GATE)
    b_y = b_xhat * tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    if HAS_Z and NORM_BEFORE_GATE:
        b_y = b_y * (b_z * tl.sigmoid(b_z))
    tl.store(p_y + o_m.to(tl.int64)[:, None] * dim + o_c[None, :], b_y.to(p_y.dtype.element_ty), mask=m_mc)


@triton.jit
def gated_rms_norm_bwd_kernel(p_dy, p_x, p_z, p_w, p_dx, p_dz, p_dw_partial, rows, inner, dim, group_size, eps,
                              stride_dy_outer, stride_dy_inner, stride_x_outer, stride_x_inner,
                              stride_z_outer, stride_z_inner,
                              HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """dx, dz (rows, d) contiguous and this program's weight gradient, dw_partial[i_p, group];
    grid (programs x groups,), the group fastest; program i_p takes row tiles i_p, i_p + programs, ...

    With s the normalised input (x * silu(z) gated first, else x), xhat = s * rstd and the gradient
    dxhat reaching xhat: ds = rstd * (dxhat - xhat * mean(dxhat * xhat)) over the group."""
    n_groups = dim // group_size
    i_p, i_g = tl.program_id(0) // n_groups, tl.program_id(0) % n_groups
    n_programs = tl.num_programs(0) // n_groups
    o_c = i_g * group_size + tl.arange(0, BLOCK_G)
    m_c = tl.arange(0, BLOCK_G) < group_size
    b_w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    b_dw = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for i_m in range(i_p, tl.cdiv(rows, BLOCK_M), n_programs):
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < rows
        m_mc = m_m[:, None] & m_c[None, :]
        o_x = _row_offsets(o_m, inner, stride_x_outer, stride_x_inner)[:, None] + o_c[None, :]
        o_out = o_m.to(tl.int64)[:, None] * dim + o_c[None, :]
        b_x = tl.load(p_x + o_x, mask=m_mc, other=0.0).to(tl.float32)
        b_dy = tl.load(p_dy + _row_offsets(o_m, inner, stride_dy_outer, stride_dy_inner)[:, None] + o_c[None, :],
                       mask=m_mc, other=0.0).to(tl.float32)
        b_z = b_x
        b_sig = b_x
        if HAS_Z:
            b_z = tl.load(p_z + _row_offsets(o_m, inner, stride_z_outer, stride_z_inner)[:, None] + o_c[None, :],
                          mask=m_mc, other=0.0).to(tl.float32)
            b_sig = tl.sigmoid(b_z)
        b_xhat, b_rstd = _normalize(b_x, b_z, m_m, group_size, eps, HAS_Z, NORM_BEFORE_GATE)
        if HAS_Z and NORM_BEFORE_GATE:
            # y = xhat * w * silu(z): silu'(z) = sig (1 + z (1 - sig))
            b_dz = b_dy * b_xhat * b_w[None, :] * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(p_dz + o_out, b_dz.to(p_dz.dtype.element_ty), mask=m_mc)
            b_dy = b_dy * (b_z * b_sig)
        b_dw += tl.sum(b_dy * b_xhat, axis=0)
        b_dxhat = b_dy * b_w[None, :]
        b_ds = (b_dxhat - b_xhat * (tl.sum(b_dxhat * b_xhat, axis=1) / group_size)[:, None]) * b_rstd[:, None]
        if HAS_Z and not NORM_BEFORE_GATE:
            # s = x * silu(z)
            b_dz = b_ds * b_x * b_sig * (1.0 + b_z * (1.0 - b_sig))
            tl.store(p_dz + o_out, b_dz.to(p_dz.dtype.element_ty), mask=m_mc)
            b_ds = b_ds * (b_z * b_sig)
        tl.store(p_dx + o_out, b_ds.to(p_dx.dtype.element_ty), mask=m_mc)
    tl.store(p_dw_partial + i_p * dim + o_c, b_dw, mask=m_c)


# ----------------------------------------------------------------------------------------------
# Residual add + RMSNorm / LayerNorm (the pre-norm block input), rows (rows, d) contiguous.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _add_norm_rows(p_x, p_res, p_res_out, p_w, o_md, m_md, m_m, dim, eps,
                   HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, IS_RMS: tl.constexpr):
    """-> (sum, xhat, rstd) for one row tile: sum = x [+ residual] in fp32; the norm's input is the
    sum rounded to the stored residual's dtype, then to the weight's dtype; xhat is it normalised
    in fp32 (zero on rows past the end) and rstd (BLOCK_M,) the 1 / rms (or 1 / std) per row."""
    b_sum = tl.load(p_x + o_md, mask=m_md, other=0.0).to(tl.float32)
    if HAS_RES:
        b_sum += tl.load(p_res + o_md, mask=m_md, other=0.0).to(tl.float32)
    b_t = b_sum
    if STORE_RES:
        b_t = b_t.to(p_res_out.dtype.element_ty).to(tl.float32)
    b_t = b_t.to(p_w.dtype.element_ty).to(tl.float32)
    if not IS_RMS:
        b_t = tl.where(m_md, b_t - (tl.sum(b_t, axis=1) / dim)[:, None], 0.0)
    b_rstd = tl.where(m_m, 1.0 / tl.sqrt(tl.sum(b_t * b_t, axis=1) / dim + eps), 0.0)
    return b_sum, b_t * b_rstd[:, None], b_rstd


@triton.jit
def add_norm_fwd_kernel(p_x, p_res, p_w, p_b, p_y, p_res_out, rows, dim, eps,
                        HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, IS_RMS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """new residual = x [+ residual] (stored if STORE_RES), y = norm(new residual) * w [+ b] in the
    weight's dtype; grid (row tiles,)."""
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < rows, o_d < dim
    m_md = m_m[:, None] & m_d[None, :]
    o_md = o_m.to(tl.int64)[:, None] * dim + o_d[None, :]
    b_sum, b_xhat, _ = _add_norm_rows(p_x, p_res, p_res_out, p_w, o_md, m_md, m_m, dim, eps,
                                      HAS_RES, STORE_RES, IS_RMS)
    if STORE_RES:
        tl.store(p_res_out + o_md, b_sum.to(p_res_out.dtype.element_ty), mask=m_md)
    b_y = b_xhat * tl.load(p_w + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b_y += tl.load(p_b + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    tl.store(p_y + o_md, b_y.to(p_y.dtype.element_ty), mask=m_md)


@triton.jit
def add_norm_bwd_kernel(p_dy, p_dres_out, p_x, p_res, p_res_out, p_w, p_dx, p_dres, p_dw_partial, p_db_partial,
                        rows, dim, eps, HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, IS_RMS: tl.constexpr,
                        HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx (and dresidual with HAS_RES) = d norm input + d new residual, in their inputs' dtypes,
    and this program's weight and bias gradients dw_partial / db_partial[i_p]; program i_p takes
    row tiles i_p, i_p + programs, ...

    With xhat the normalised input and g = dy * w: d input = rstd (g - xhat mean(g xhat)) for
    RMSNorm, rstd (g - mean(g) - xhat mean(g xhat)) for LayerNorm (the roundings pass gradients
    through unchanged). p_res_out only names the stored residual's dtype; it is not read."""
    i_p, n_programs = tl.program_id(0), tl.num_programs(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < dim
    b_w = tl.load(p_w + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    b_db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i_m in range(i_p, tl.cdiv(rows, BLOCK_M), n_programs):
        o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_m = o_m < rows
        m_md = m_m[:, None] & m_d[None, :]
        o_md = o_m.to(tl.int64)[:, None] * dim + o_d[None, :]
        _, b_xhat, b_rstd = _add_norm_rows(p_x, p_res, p_res_out, p_w, o_md, m_md, m_m, dim, eps,
                                           HAS_RES, STORE_RES, IS_RMS)
        b_dy = tl.load(p_dy + o_md, mask=m_md, other=0.0).to(tl.float32)
        b_dw += tl.sum(b_dy * b_xhat, axis=0)
        b_db += tl.sum(b_dy, axis=0)
        b_g = b_dy * b_w[None, :]
        b_dt = b_g - b_xhat * (tl.sum(b_g * b_xhat, axis=1) / dim)[:, None]
        if not IS_RMS:
            b_dt -= (tl.sum(b_g, axis=1) / dim)[:, None]
        b_dt = b_dt * b_rstd[:, None]
        if HAS_DRES:
            b_dt += tl.load(p_dres_out + o_md, mask=m_md, other=0.0).to(tl.float32)
        tl.store(p_dx + o_md, b_dt.to(p_dx.dtype.element_ty), mask=m_md)
        if HAS_RES:
            tl.store(p_dres + o_md, b_dt.to(p_dres.dtype.element_ty), mask=m_md)
    tl.store(p_dw_partial + i_p * dim + o_d, b_dw, mask=m_d)
    tl.store(p_db_partial + i_p * dim + o_d, b_db, mask=m_d)
