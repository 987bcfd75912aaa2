"""Launchers of the Triton gated RMSNorm, registered as PyTorch custom ops with their autograd."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels as kernels
from .._backend import cdiv, interpreting, next_power_of_2, sm_count
from .._checks import grad_needed
from .._compile import compile_ahead, launch

# Per program a tile of BLOCK_M rows x BLOCK_G >= group_size channels, about TILE_ELEMENTS values,
# with warps for about ELEMENTS_PER_THREAD fp32 values of each live tile per thread: the backward
# holds about twice as many tiles (x, z, dy, the gate, xhat, ...), so it takes smaller tiles and
# fewer values per thread (for sm_90: no spills up to groups of 4096, 96 bytes at 8192; read from
# an offline compile, not timed). Groups wider than a tile take one row per program; above
# MAX_GROUP_SIZE they would not fit in registers and the dispatcher sends them to the reference.
TILE_ELEMENTS = {"fwd": 4096, "bwd": 2048}
ELEMENTS_PER_THREAD = {"fwd": 32, "bwd": 8}
MAX_GROUP_SIZE = 16384
# Backward programs per streaming multiprocessor (each sums its weight gradient over many rows).
BWD_PROGRAMS_PER_SM = 4


def _as_rows(t: Tensor) -> Tensor:
    """(..., d) -> a (outer, inner, d) view with unit channel stride (inner = the second-to-last
    axis); copies only when no such view exists (channels not unit-stride, or leading axes that
    do not merge)."""
    d = t.shape[-1]
    inner = t.shape[-2] if t.dim() >= 2 else 1
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, inner, d)
    except RuntimeError:  # leading axes (all but the last two) not mergeable into one stride
        return t.contiguous().view(-1, inner, d)


def _tile(group_size: int, pass_: str) -> dict:
    block_g = next_power_of_2(group_size)
    block_m = max(1, TILE_ELEMENTS[pass_] // block_g)
    num_warps = block_m * block_g // (32 * ELEMENTS_PER_THREAD[pass_])
    return dict(BLOCK_M=block_m, BLOCK_G=block_g, num_warps=min(16, max(4, num_warps)))


def _bwd_programs_target() -> int:
    """Backward row programs to aim for (over all groups): a few per SM of the current device (where
    Triton launches), 4 under the interpreter (so that CI runs several programs with several row
    tiles each)."""
    if interpreting():
        return 4
    return BWD_PROGRAMS_PER_SM * sm_count(torch.cuda.current_device())


def _gated_rms_norm_fwd(x: Tensor, weight: Tensor, z: Optional[Tensor], eps: float, group_size: int,
                       norm_before_gate: bool) -> Tensor:
    """y (..., d) contiguous in x's dtype; x and z (..., d) any strides with unit channel stride."""
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    xr = _as_rows(x)
    rows, inner, d = xr.shape[0] * xr.shape[1], xr.shape[1], xr.shape[2]
    if rows == 0:
        return y
    zr = _as_rows(z) if z is not None else None
    tile = _tile(group_size, "fwd")
    grid = (cdiv(rows, tile["BLOCK_M"]) * (d // group_size),)
    launch(kernels.gated_rms_norm_fwd_kernel, grid,
        xr, zr, weight, y, rows, inner, d, group_size, eps, xr.stride(0), xr.stride(1),
        *((zr.stride(0), zr.stride(1)) if zr is not None else (0, 0)),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, **tile)
    return y


gated_rms_norm_fwd = torch.library.custom_op("mambakit::gated_rms_norm_fwd", _gated_rms_norm_fwd, mutates_args=())


@gated_rms_norm_fwd.register_fake
def _(x, weight, z, eps, group_size, norm_before_gate):
    return torch.empty(x.shape, device=x.device, dtype=x.dtype)


def _gated_rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor, z: Optional[Tensor], eps: float, group_size: int,
                       norm_before_gate: bool) -> list[Tensor]:
    """-> [dx (x's dtype), dweight (weight's dtype), dz (z's dtype; empty without z)], all contiguous."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype) if z is not None else x.new_empty(0)
    xr, dyr = _as_rows(x), _as_rows(dy)
    rows, inner, d = xr.shape[0] * xr.shape[1], xr.shape[1], xr.shape[2]
    if rows == 0:
        return [dx, torch.zeros_like(weight), dz]
    zr = _as_rows(z) if z is not None else None
    tile = _tile(group_size, "bwd")
    programs = min(cdiv(rows, tile["BLOCK_M"]), max(1, _bwd_programs_target() * group_size // d))
    dw_partial = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    launch(kernels.gated_rms_norm_bwd_kernel, (programs * (d // group_size),),
        dyr, xr, zr, weight, dx, dz, dw_partial, rows, inner, d, group_size, eps,
        dyr.stride(0), dyr.stride(1), xr.stride(0), xr.stride(1),
        *((zr.stride(0), zr.stride(1)) if zr is not None else (0, 0)),
        HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate, **tile)
    return [dx, dw_partial.sum(0).to(weight.dtype), dz]


gated_rms_norm_bwd = torch.library.custom_op("mambakit::gated_rms_norm_bwd", _gated_rms_norm_bwd, mutates_args=())


def _gated_forward_and_backward(x, weight, z, eps, group_size, norm_before_gate, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    y = _gated_rms_norm_fwd(x, weight, z, eps, group_size, norm_before_gate)
    if backward:
        _gated_rms_norm_bwd(torch.empty_like(y), x, weight, z, eps, group_size, norm_before_gate)


@gated_rms_norm_bwd.register_fake
def _(dy, x, weight, z, eps, group_size, norm_before_gate):
    return [torch.empty(x.shape, device=x.device, dtype=x.dtype), torch.empty_like(weight),
            torch.empty(z.shape, device=z.device, dtype=z.dtype) if z is not None else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, z, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, weight, z)
    ctx.eps, ctx.group_size, ctx.norm_before_gate = eps, group_size, norm_before_gate


def _backward(ctx, dy):
    x, weight, z = ctx.saved_tensors
    dx, dw, dz = gated_rms_norm_bwd(dy, x, weight, z, ctx.eps, ctx.group_size, ctx.norm_before_gate)
    return dx, dw, dz if z is not None else None, None, None, None


gated_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def gated_rms_norm_triton(x, weight, z, eps, group_size, norm_before_gate):
    """Triton path of :func:`mambakit.ops.norm.gated_rms_norm` (inputs validated, group_size an int)."""
    args = (x, weight.contiguous(), z, float(eps), group_size, norm_before_gate)
    compile_ahead("gated_rms_norm", _gated_forward_and_backward, *args, grad_needed(x, weight, z))
    return gated_rms_norm_fwd(*args)


# ----------------------------------------------------------------------------------------------
# Residual add + norm
# ----------------------------------------------------------------------------------------------


def _add_norm_tile(d: int, pass_: str) -> dict:
    """Rows of d channels per program, as the gated norm's tile for one group of d."""
    tile = _tile(d, pass_)
    return dict(BLOCK_M=tile["BLOCK_M"], BLOCK_D=tile["BLOCK_G"], num_warps=tile["num_warps"])


def _add_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
                 is_rms: bool, residual_in_fp32: bool) -> list[Tensor]:
    """-> [normed (..., d) in weight's dtype, new residual (..., d)]. The new residual is float32
    with residual_in_fp32, else x's dtype; it is empty when it would be x itself (no residual,
    not residual_in_fp32), which the caller then uses."""
    store_residual = residual is not None or residual_in_fp32
    xr = x.reshape(-1, x.shape[-1])
    rr = residual.reshape(xr.shape) if residual is not None else None
    y = torch.empty(x.shape, device=x.device, dtype=weight.dtype)
    new_residual = torch.empty(x.shape, device=x.device, dtype=torch.float32 if residual_in_fp32 else x.dtype) \
        if store_residual else x.new_empty(0)
    rows, d = xr.shape
    if rows:
        tile = _add_norm_tile(d, "fwd")
        launch(kernels.add_norm_fwd_kernel, (cdiv(rows, tile["BLOCK_M"]),),
            xr, rr, weight, bias, y, new_residual, rows, d, eps, HAS_RES=residual is not None,
            STORE_RES=store_residual, IS_RMS=is_rms, HAS_BIAS=bias is not None, **tile)
    return [y, new_residual]


add_norm_fwd = torch.library.custom_op("mambakit::add_norm_fwd", _add_norm_fwd, mutates_args=())


@add_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, is_rms, residual_in_fp32):
    store_residual = residual is not None or residual_in_fp32
    return [torch.empty(x.shape, device=x.device, dtype=weight.dtype),
            torch.empty(x.shape, device=x.device, dtype=torch.float32 if residual_in_fp32 else x.dtype)
            if store_residual else x.new_empty(0)]


def _add_norm_bwd(dy: Tensor, dnew_residual: Optional[Tensor], x: Tensor, residual: Optional[Tensor],
                 weight: Tensor, eps: float, is_rms: bool, residual_in_fp32: bool) -> list[Tensor]:
    """-> [dx (x's dtype), dresidual (residual's dtype; empty without one), dweight, dbias (both
    float32)]; dy, dnew_residual (..., d) as the forward's outputs (dnew_residual may be None)."""
    store_residual = residual is not None or residual_in_fp32
    xr = x.reshape(-1, x.shape[-1])
    rows, d = xr.shape
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dres = torch.empty(x.shape, device=x.device, dtype=residual.dtype) if residual is not None else x.new_empty(0)
    if rows == 0:
        zeros = torch.zeros(d, device=x.device, dtype=torch.float32)
        return [dx, dres, zeros, zeros.clone()]
    tile = _add_norm_tile(d, "bwd")
    programs = min(cdiv(rows, tile["BLOCK_M"]), _bwd_programs_target())
    dw_partial = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    db_partial = torch.empty(programs, d, device=x.device, dtype=torch.float32)
    residual_dtype_of = torch.empty(0, device=x.device, dtype=torch.float32 if residual_in_fp32 else x.dtype)
    launch(kernels.add_norm_bwd_kernel, (programs,),
        dy.reshape(xr.shape).contiguous(),
        dnew_residual.reshape(xr.shape).contiguous() if dnew_residual is not None else None,
        xr, residual.reshape(xr.shape) if residual is not None else None, residual_dtype_of, weight,
        dx, dres, dw_partial, db_partial, rows, d, eps, HAS_RES=residual is not None, STORE_RES=store_residual,
        IS_RMS=is_rms, HAS_DRES=dnew_residual is not None, **tile)
    return [dx, dres, dw_partial.sum(0), db_partial.sum(0)]


add_norm_bwd = torch.library.custom_op("mambakit::add_norm_bwd", _add_norm_bwd, mutates_args=())


def _add_norm_forward_and_backward(x, residual, weight, bias, eps, is_rms, residual_in_fp32, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    y, new_residual = _add_norm_fwd(x, residual, weight, bias, eps, is_rms, residual_in_fp32)
    if backward:
        dnew_residual = torch.empty_like(new_residual) if new_residual.numel() else None
        _add_norm_bwd(torch.empty_like(y), dnew_residual, x, residual, weight, eps, is_rms, residual_in_fp32)


@add_norm_bwd.register_fake
def _(dy, dnew_residual, x, residual, weight, eps, is_rms, residual_in_fp32):
    d = x.shape[-1]
    return [torch.empty(x.shape, device=x.device, dtype=x.dtype),
            torch.empty(x.shape, device=x.device, dtype=residual.dtype) if residual is not None else x.new_empty(0),
            x.new_empty(d, dtype=torch.float32), x.new_empty(d, dtype=torch.float32)]


def _add_norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, residual_in_fp32 = inputs
    ctx.save_for_backward(x, residual, weight)
    ctx.bias_dtype, ctx.eps, ctx.is_rms, ctx.residual_in_fp32 = None if bias is None else bias.dtype, eps, is_rms, residual_in_fp32
    ctx.stored_residual = residual is not None or residual_in_fp32


def _add_norm_backward(ctx, grads):
    dy, dnew_residual = grads
    x, residual, weight = ctx.saved_tensors
    if not ctx.stored_residual:  # the op returned no residual (the caller uses x itself)
        dnew_residual = None
    dx, dres, dw, db = add_norm_bwd(dy, dnew_residual, x, residual, weight, ctx.eps, ctx.is_rms,
                                    ctx.residual_in_fp32)
    return (dx, dres if residual is not None else None, dw.to(weight.dtype),
            None if ctx.bias_dtype is None else db.to(ctx.bias_dtype), None, None, None)


add_norm_fwd.register_autograd(_add_norm_backward, setup_context=_add_norm_setup_context)


def add_norm_triton(x, residual, weight, bias, eps, kind, residual_in_fp32):
    """Triton path of :func:`mambakit.ops.norm.add_norm` (inputs validated) -> (normed, new residual)."""
    contiguous = [t.contiguous() if t is not None else None for t in (x, residual, weight, bias)]
    x, residual, weight, bias = contiguous
    args = (x, residual, weight, bias, float(eps), kind == "rms", residual_in_fp32)
    compile_ahead("add_norm", _add_norm_forward_and_backward, *args, grad_needed(x, residual, weight, bias))
    normed, new_residual = add_norm_fwd(*args)
    if residual is None and not residual_in_fp32:
        new_residual = x
    return normed, new_residual
