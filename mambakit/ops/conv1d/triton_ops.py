"""Launchers of the Triton causal conv1d, registered as PyTorch custom ops with their autograd."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from . import triton_kernels as kernels
from ..common.segments import canonical_segments

BLOCK_D, BLOCK_L = 16, 128


def _grid(x: Tensor):
    b, d, length = x.shape
    return (triton.cdiv(length, BLOCK_L), triton.cdiv(d, BLOCK_D), b)


@torch.library.custom_op("mambakit::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      segment: Optional[Tensor], silu: bool) -> Tensor:
    """y (b, d, l) in x's dtype; ``segment`` are canonical int32 segment ids (b, l) or None."""
    y = torch.empty_like(x)
    b, d, length = x.shape
    kernels.conv1d_fwd_kernel[_grid(x)](
        x, weight, bias, initial_state, segment, y, d, length, W=weight.shape[1], HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None, HAS_SEQ=segment is not None, SILU=silu, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    return y


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, segment, silu):
    return torch.empty_like(x)


@torch.library.custom_op("mambakit::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      segment: Optional[Tensor], silu: bool) -> list[Tensor]:
    """-> [dx, dweight, dbias (empty without bias), dinitial_state (empty without one)]."""
    b, d, length = x.shape
    w = weight.shape[1]
    dx = torch.empty_like(x)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(d if bias is not None else 1, device=x.device, dtype=torch.float32)
    kernels.conv1d_bwd_kernel[_grid(x)](
        x, weight, bias, initial_state, segment, dy, dx, dw, dbias, d, length, W=w, HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None, HAS_SEQ=segment is not None, SILU=silu, BLOCK_D=BLOCK_D, BLOCK_L=BLOCK_L)
    d_init = x.new_empty(0)
    if initial_state is not None:
        d_init = _initial_state_grad(dy, x, weight, bias, initial_state, segment, silu)
    return [dx, dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else x.new_empty(0), d_init]


def _initial_state_grad(dy, x, weight, bias, initial_state, segment, silu):
    """dL/d(initial_state): state entry q (position q - (w-1)) feeds outputs t = q - k through
    weight[:, k], for the first w - 1 outputs of segment 0 only (a few columns: plain torch)."""
    w = weight.shape[1]
    head = min(w - 1, x.shape[2])
    wf = weight.float()
    padded = torch.cat([initial_state.float(), x[..., :head].float()], dim=-1)
    pre = F.conv1d(padded, wf[:, None, :], None if bias is None else bias.float(), groups=x.shape[1])  # (b, d, head)
    g = dy[..., :head].float()
    if silu:
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    if segment is not None:
        g = g * (segment[:, None, :head] == 0)
    d_init = torch.zeros_like(initial_state, dtype=torch.float32)
    for q in range(w - 1):
        for k in range(q + 1):
            if q - k < head:
                d_init[..., q] += wf[:, k] * g[..., q - k]
    return d_init.to(initial_state.dtype)


@causal_conv1d_bwd.register_fake
def _(dy, x, weight, bias, initial_state, segment, silu):
    return [torch.empty_like(x), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else x.new_empty(0),
            torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, segment, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, segment)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, initial_state, segment = ctx.saved_tensors
    dx, dw, dbias, d_init = causal_conv1d_bwd(dy.contiguous(), x, weight, bias, initial_state, segment, ctx.silu)
    return dx, dw, dbias if bias is not None else None, d_init if initial_state is not None else None, None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False,
                         seq_idx=None):
    """Triton path of :func:`mambakit.ops.conv1d.causal_conv1d` (inputs already validated)."""
    def c(t):
        return None if t is None else t.contiguous()

    segment = None if seq_idx is None else canonical_segments(seq_idx).to(torch.int32).contiguous()
    y = causal_conv1d_fwd(c(x), c(weight), c(bias), c(initial_state), segment, activation is not None)
    if not return_final_state:
        return y
    return y, _final_state(x, weight.shape[1] - 1, initial_state, segment)


def _final_state(x, w1, initial_state, segment):
    """The last w - 1 inputs of cat([initial_state, x]) (as the reference's final state), computed
    from the tail only; differentiable in plain torch."""
    length = x.shape[2]
    if length >= w1:
        tail = x[..., length - w1:]
    else:
        state = x.new_zeros(x.shape[0], x.shape[1], w1) if initial_state is None else initial_state.to(x.dtype)
        tail = torch.cat([state, x], dim=-1)[..., -w1:] if w1 else x[..., :0]
    if segment is None:
        return tail
    positions = torch.arange(length - w1, length, device=x.device)
    seg_tail = torch.where(positions >= 0, segment[:, positions.clamp(min=0)], 0)  # state entries: segment 0
    keep = seg_tail == segment[:, -1:]
    return tail * keep[:, None, :].to(tail.dtype)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """Triton path of :func:`mambakit.ops.conv1d.causal_conv1d_update` (validated; updates conv_state
    in place)."""
    b, d = x.shape
    y = torch.empty_like(x)
    block_d = 128
    kernels.conv1d_update_kernel[(triton.cdiv(d, block_d), b)](
        x.contiguous(), conv_state, weight.contiguous(), bias, y, d, W=weight.shape[1], HAS_BIAS=bias is not None,
        SILU=activation is not None, BLOCK_D=block_d)
    return y
