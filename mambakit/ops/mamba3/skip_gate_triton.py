"""The SISO output epilogue of the Triton Mamba-3 path as one custom op with backward:

    y = (y_core + s x) * silu(z)        (without z: y = y_core + s x)

y_core, x, z (b, l, h, p); s (b, l, h) float32, one skip weight per token and head (for Mamba-3,
D - c_{t+1} K_t . Q_t). One pass over the (b, l, h, p) tensors each way instead of PyTorch's
float32 intermediates. Forward and backward: one program per block of token-head rows, p padded to
a power of two.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import cdiv, next_power_of_2
from .._compile import compile_ahead, launch

F32 = torch.float32
BLOCK_R = 32  # (token, head) rows per program


@triton.jit
def _rows(t_ptr, stride_b, stride_l, stride_h, rows, pid, L: tl.constexpr, H: tl.constexpr, P: tl.constexpr,
          PP: tl.constexpr, BLOCK_R: tl.constexpr):
    """-> (the row indices (BLOCK_R,), the (BLOCK_R, PP) pointers into t, the mask)."""
    offs_r = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    offs_p = tl.arange(0, PP)
    bi, li, hi = offs_r // (L * H), (offs_r // H) % L, offs_r % H
    mask = (offs_r < rows)[:, None] & (offs_p < P)[None, :]
    return offs_r, t_ptr + (bi * stride_b + li * stride_l + hi * stride_h)[:, None] + offs_p[None, :], mask


@triton.jit
def skip_gate_fwd_kernel(
    yc_ptr, x_ptr, s_ptr, z_ptr, y_ptr, rows, sx_b, sx_l, sx_h, sz_b, sz_l, sz_h,
    L: tl.constexpr, H: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r, x_at, mask = _rows(x_ptr, sx_b, sx_l, sx_h, rows, pid, L, H, P, PP, BLOCK_R)
    packed_at = offs_r[:, None] * P + tl.arange(0, PP)[None, :]
    s = tl.load(s_ptr + offs_r, mask=offs_r < rows, other=0.0)
    y = tl.load(yc_ptr + packed_at, mask=mask, other=0.0).to(tl.float32)
    y += s[:, None] * tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        _, z_at, _ = _rows(z_ptr, sz_b, sz_l, sz_h, rows, pid, L, H, P, PP, BLOCK_R)
        z = tl.load(z_at, mask=mask, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + packed_at, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def skip_gate_bwd_kernel(
    dy_ptr, yc_ptr, x_ptr, s_ptr, z_ptr, dyc_ptr, dx_ptr, ds_ptr, dz_ptr, rows, sx_b, sx_l, sx_h, sz_b, sz_l,
    sz_h, L: tl.constexpr, H: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, HAS_Z: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """d(pre) = dy silu(z) with pre = y_core + s x; dx = s d(pre), ds = sum_p x d(pre),
    dz = dy pre silu'(z) with silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    pid = tl.program_id(0)
    offs_r, x_at, mask = _rows(x_ptr, sx_b, sx_l, sx_h, rows, pid, L, H, P, PP, BLOCK_R)
    packed_at = offs_r[:, None] * P + tl.arange(0, PP)[None, :]
    mask_r = offs_r < rows
    s = tl.load(s_ptr + offs_r, mask=mask_r, other=0.0)
    x = tl.load(x_at, mask=mask, other=0.0).to(tl.float32)
    dpre = tl.load(dy_ptr + packed_at, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        _, z_at, _ = _rows(z_ptr, sz_b, sz_l, sz_h, rows, pid, L, H, P, PP, BLOCK_R)
        z = tl.load(z_at, mask=mask, other=0.0).to(tl.float32)
        pre = tl.load(yc_ptr + packed_at, mask=mask, other=0.0).to(tl.float32) + s[:, None] * x
        sig = tl.sigmoid(z)
        tl.store(dz_ptr + packed_at, (dpre * pre * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty),
                 mask=mask)
        dpre *= z * sig
    tl.store(dyc_ptr + packed_at, dpre.to(dyc_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + packed_at, (s[:, None] * dpre).to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(ds_ptr + offs_r, tl.sum(x * dpre, 1), mask=mask_r)


def _token_head_strides(t: Optional[Tensor]) -> tuple[int, int, int]:
    """(batch, token, head) strides of a (b, l, h, p) input; zeros for None."""
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


def _unit_last_stride(t: Tensor) -> Tensor:
    """t itself if its last dim is unit-stride, else a contiguous copy (the kernels read rows of p)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _skip_gate(y_core: Tensor, x: Tensor, s: Tensor, z: Optional[Tensor]) -> Tensor:
    """y_core (b, l, h, p) contiguous, x and z (b, l, h, p) unit-stride in p, s (b, l, h) float32
    contiguous -> y (b, l, h, p) contiguous in x's dtype."""
    b, l, h, p = x.shape
    rows = b * l * h
    y = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    if rows:
        launch(skip_gate_fwd_kernel, (cdiv(rows, BLOCK_R),),
            y_core, x, s, z, y, rows, *_token_head_strides(x), *_token_head_strides(z),
            L=l, H=h, P=p, PP=next_power_of_2(p), HAS_Z=z is not None, BLOCK_R=BLOCK_R)
    return y


skip_gate_op = torch.library.custom_op("mambakit::mamba3_skip_gate", _skip_gate, mutates_args=())


@skip_gate_op.register_fake
def _(y_core, x, s, z):
    return x.new_empty(x.shape)


def _skip_gate_bwd(dy: Tensor, y_core: Tensor, x: Tensor, s: Tensor, z: Optional[Tensor]
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dy (b, l, h, p) contiguous -> (dy_core like y_core, dx (contiguous, x's dtype), ds (b, l, h)
    float32, dz (contiguous, z's dtype; empty without z))."""
    b, l, h, p = x.shape
    rows = b * l * h
    dyc = torch.empty_like(y_core)
    dx = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    ds = torch.empty(b, l, h, device=x.device, dtype=F32)
    dz = torch.empty(b, l, h, p, device=x.device, dtype=z.dtype) if z is not None else x.new_empty(0)
    if rows:
        launch(skip_gate_bwd_kernel, (cdiv(rows, BLOCK_R),),
            dy, y_core, x, s, z, dyc, dx, ds, dz, rows, *_token_head_strides(x), *_token_head_strides(z),
            L=l, H=h, P=p, PP=next_power_of_2(p), HAS_Z=z is not None, BLOCK_R=BLOCK_R)
    return dyc, dx, ds, dz


skip_gate_bwd = torch.library.custom_op("mambakit::mamba3_skip_gate_bwd", _skip_gate_bwd, mutates_args=())


@skip_gate_bwd.register_fake
def _(dy, y_core, x, s, z):
    b, l, h, p = x.shape
    return (torch.empty_like(y_core), x.new_empty(x.shape), s.new_empty(b, l, h),
            z.new_empty(z.shape) if z is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    y_core, x, s, z = inputs
    ctx.save_for_backward(y_core, x, s, z)


def _backward(ctx, dy):
    y_core, x, s, z = ctx.saved_tensors
    dyc, dx, ds, dz = skip_gate_bwd(dy.contiguous(), y_core, x, s, z)
    return dyc, dx, ds, (dz if z is not None else None)


skip_gate_op.register_autograd(_backward, setup_context=_setup)


def _skip_gate_forward_and_backward(y_core, x, s, z, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    y = _skip_gate(y_core, x, s, z)
    if backward:
        _skip_gate_bwd(y, y_core, x, s, z)


def skip_gate(y_core: Tensor, x: Tensor, s: Tensor, z: Optional[Tensor], backward: bool) -> Tensor:
    """(y_core + s x) * silu(z) (module docstring): y_core (b, l, h, p), x and z (b, l, h, p),
    s (b, l, h) float32 -> (b, l, h, p) contiguous in x's dtype. Kernels compiled ahead on a
    first call, those of the backward too if ``backward``."""
    y_core, s = y_core.contiguous(), s.contiguous()
    x = _unit_last_stride(x)
    z = None if z is None else _unit_last_stride(z)
    compile_ahead("mamba3_skip_gate", _skip_gate_forward_and_backward, y_core, x, s, z, backward)
    return skip_gate_op(y_core, x, s, z)
