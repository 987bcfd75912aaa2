"""Launchers of the Triton causal conv1d, registered as PyTorch custom ops with their autograd."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton_kernels as kernels
from .._backend import cdiv, interpreting, next_power_of_2, sm_count
from .._checks import grad_needed
from .._compile import compile_ahead, launch
from ..common.segments import segment_resets

# Tile (BLOCK_D, BLOCK_L, warps) per layout and pass: the tile's long side runs along the
# contiguous axis, so that a warp's loads cover consecutive addresses. Chosen so that the kernels
# compile for sm_90 without spills at about 128 registers or fewer per thread (the backward holds
# the W shifted tiles of x and dy at once): occupancy is what hides the latency of these loads.
TIME_CONTIGUOUS_TILES = {"fwd": dict(BLOCK_D=16, BLOCK_L=128, num_warps=4),
                         "bwd": dict(BLOCK_D=16, BLOCK_L=128, num_warps=8)}
# Channel-last tiles from benchmarks/tune_conv1d.py on an H100 (130M-class layers, 8 x 2048 tokens,
# bf16): forward 315 -> 152 us and backward 616 -> 388 us over its two shapes against the earlier
# 64 x 32 tiles of 8 warps.
CHANNEL_LAST_TILES = {"fwd": dict(BLOCK_D=128, BLOCK_L=32, num_warps=4),
                      "bwd": dict(BLOCK_D=32, BLOCK_L=16, num_warps=4)}
# The backward's programs each walk several time tiles (summing their weight gradients before one
# atomic add); it takes as many tiles per program as still leave this many programs per SM.
BWD_PROGRAMS_PER_SM = 8
MAX_TILES_PER_PROGRAM = 64
# Sequence start of a row's first packed sequence: before any position the kernels see (the
# initial state's included), so that sequence reads everything.
FIRST_SEQUENCE_START = -(1 << 30)


def is_channel_last(x: Tensor) -> bool:
    """x (b, d, l) whose channels are adjacent in memory (memory (b, l, d), maybe with a row stride
    wider than d), as ``x.transpose(1, 2)`` of a (b, l, d) tensor or of a column slice of one."""
    return x.stride(1) == 1 and x.stride(2) != 1


def _kernel_layout(x: Tensor) -> Tensor:
    """x itself when one of its last two axes is unit-stride (both layouts the kernels tile well),
    else a contiguous copy."""
    return x if x.stride(1) == 1 or x.stride(2) == 1 else x.contiguous()


def is_channel_major(x: Tensor) -> bool:
    """x (b, d, l) time-contiguous with its rows ordered channel first (memory (d, b, l), maybe with
    a channel stride wider than b l), as a (b, d, l) view of a column block of a (D, b l) product
    such as ``in_proj.weight @ hidden.reshape(b l, d_model).T``."""
    return x.stride(2) == 1 and x.shape[0] > 1 and x.shape[1] > 1 and x.stride(1) > x.stride(0)


def _empty_in_layout_of(x: Tensor) -> Tensor:
    """An uninitialised (b, d, l) tensor like x, dense: channel-last (memory (b, l, d)) or
    channel-major (memory (d, b, l)) if x is, else contiguous."""
    b, d, length = x.shape
    if is_channel_last(x):
        return x.new_empty(b, length, d).transpose(1, 2)
    if is_channel_major(x):
        return x.new_empty(d, b, length).transpose(0, 1)
    return x.new_empty(b, d, length)


def _strides(t: Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _tile(x: Tensor, pass_: str) -> dict:
    return (CHANNEL_LAST_TILES if is_channel_last(x) else TIME_CONTIGUOUS_TILES)[pass_]


def _launch(kernel, x: Tensor, pass_: str, *args, **constants):
    """Launch ``kernel`` over (time tiles, channel blocks, batch rows) with the tile of x's layout."""
    b, d, length = x.shape
    tile = _tile(x, pass_)
    grid = (cdiv(length, tile["BLOCK_L"]), cdiv(d, tile["BLOCK_D"]), b)
    launch(kernel, grid, *args, **constants, **tile)


def _tiles_per_program(n_tiles: int, other_programs: int) -> int:
    """Time tiles per backward program: 2 under the interpreter (CI then runs programs of several
    tiles and several programs per row), else the most (a power of two, at most
    MAX_TILES_PER_PROGRAM) that leave BWD_PROGRAMS_PER_SM programs per SM of the current device
    (where Triton launches)."""
    if interpreting():
        return 2
    target = BWD_PROGRAMS_PER_SM * sm_count(torch.cuda.current_device())
    tiles = 1
    while tiles < MAX_TILES_PER_PROGRAM and cdiv(n_tiles, 2 * tiles) * other_programs >= target:
        tiles *= 2
    return tiles


def sequence_starts(seq_idx: Tensor) -> Tensor:
    """(b, l) ids -> (b, l) int32: the position where each token's packed sequence starts (a new one
    wherever the id changes), FIRST_SEQUENCE_START for a row's first sequence."""
    positions = torch.arange(seq_idx.shape[1], device=seq_idx.device).expand_as(seq_idx)
    starts = torch.where(segment_resets(seq_idx), positions, FIRST_SEQUENCE_START)
    return starts.cummax(dim=1).values.to(torch.int32).contiguous()


def _causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      starts: Optional[Tensor], silu: bool) -> Tensor:
    """y (b, d, l) in x's dtype and layout (time-contiguous or channel-last, see
    :func:`is_channel_last`); ``starts`` from :func:`sequence_starts` or None."""
    y = _empty_in_layout_of(x)
    _launch(kernels.conv1d_fwd_kernel, x, "fwd", x, weight, bias, initial_state, starts, y, x.shape[1], x.shape[2],
            *_strides(x), *_strides(y), W=weight.shape[1], HAS_BIAS=bias is not None,
            HAS_INIT=initial_state is not None, HAS_SEQ=starts is not None, SILU=silu)
    return y


causal_conv1d_fwd = torch.library.custom_op("mambakit::causal_conv1d_fwd", _causal_conv1d_fwd, mutates_args=())


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, initial_state, starts, silu):
    return _empty_in_layout_of(x)


def _causal_conv1d_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor],
                      starts: Optional[Tensor], silu: bool) -> list[Tensor]:
    """-> [dx (x's layout), dweight, dbias (empty without bias), dinitial_state (empty without one)]."""
    d = x.shape[1]
    dx = _empty_in_layout_of(x)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    dbias = torch.zeros(d if bias is not None else 1, device=x.device, dtype=torch.float32)
    b, _, length = x.shape
    tile = _tile(x, "bwd")
    n_tiles, d_blocks = cdiv(length, tile["BLOCK_L"]), cdiv(d, tile["BLOCK_D"])
    tiles = _tiles_per_program(n_tiles, d_blocks * b)
    w = weight.shape[1]
    launch(kernels.conv1d_bwd_kernel, (cdiv(n_tiles, tiles), d_blocks, b),
        x, weight, bias, initial_state, starts, dy, dx, dw, dbias, d, length, tiles, *_strides(x), *_strides(dy),
        *_strides(dx), W=w, WP=next_power_of_2(w), HAS_BIAS=bias is not None,
        HAS_INIT=initial_state is not None, HAS_SEQ=starts is not None, SILU=silu, **tile)
    d_init = x.new_empty(0)
    if initial_state is not None:
        d_init = _initial_state_grad(dy, x, weight, bias, initial_state, starts, silu)
    return [dx, dw.to(weight.dtype), dbias.to(bias.dtype) if bias is not None else x.new_empty(0), d_init]


causal_conv1d_bwd = torch.library.custom_op("mambakit::causal_conv1d_bwd", _causal_conv1d_bwd, mutates_args=())


def _forward_and_backward(x, weight, bias, initial_state, starts, silu, backward):
    """Every launch of a forward and, if ``backward``, of its backward (for compile_ahead)."""
    y = _causal_conv1d_fwd(x, weight, bias, initial_state, starts, silu)
    if backward:
        _causal_conv1d_bwd(_kernel_layout(torch.empty_like(y)), x, weight, bias, initial_state, starts, silu)


def _initial_state_grad(dy, x, weight, bias, initial_state, starts, silu):
    """dL/d(initial_state): state entry q (position q - (w-1)) feeds outputs t = q - k through
    weight[:, k], for the first w - 1 outputs of a row's first sequence only (a few columns: plain torch)."""
    w = weight.shape[1]
    head = min(w - 1, x.shape[2])
    wf = weight.float()
    padded = torch.cat([initial_state.float(), x[..., :head].float()], dim=-1)
    pre = F.conv1d(padded, wf[:, None, :], None if bias is None else bias.float(), groups=x.shape[1])  # (b, d, head)
    g = dy[..., :head].float()
    if silu:
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    if starts is not None:
        g = g * (starts[:, None, :head] == FIRST_SEQUENCE_START)  # outputs of the first sequence only
    d_init = torch.zeros_like(initial_state, dtype=torch.float32)
    for q in range(w - 1):
        for k in range(q + 1):
            if q - k < head:
                d_init[..., q] += wf[:, k] * g[..., q - k]
    return d_init.to(initial_state.dtype)


@causal_conv1d_bwd.register_fake
def _(dy, x, weight, bias, initial_state, starts, silu):
    return [_empty_in_layout_of(x), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else x.new_empty(0),
            torch.empty_like(initial_state) if initial_state is not None else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, initial_state, starts, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_state, starts)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, initial_state, starts = ctx.saved_tensors
    dx, dw, dbias, d_init = causal_conv1d_bwd(_kernel_layout(dy), x, weight, bias, initial_state, starts, ctx.silu)
    return dx, dw, dbias if bias is not None else None, d_init if initial_state is not None else None, None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False,
                         seq_idx=None):
    """Triton path of :func:`mambakit.ops.conv1d.causal_conv1d` (inputs already validated).

    x (b, d, l) is read in place when time-contiguous (``x.stride(2) == 1``) or channel-last
    (``x.stride(1) == 1``: memory (b, l, d), e.g. ``xBC.transpose(1, 2)`` of a column slice of a
    (b, l, D) projection), and y (b, d, l) comes back in the same layout (dense; a time-contiguous
    x whose channel stride exceeds its batch stride gives a channel-major y, memory (d, b, l));
    any other layout is copied to contiguous first.
    """
    def c(t):
        return None if t is None else t.contiguous()

    starts = None if seq_idx is None else sequence_starts(seq_idx)
    args = (_kernel_layout(x), c(weight), c(bias), c(initial_state), starts, activation is not None)
    compile_ahead("causal_conv1d", _forward_and_backward, *args, grad_needed(x, weight, bias, initial_state))
    y = causal_conv1d_fwd(*args)
    if not return_final_state:
        return y
    return y, _final_state(x, weight.shape[1] - 1, initial_state, starts)


def _final_state(x, w1, initial_state, starts):
    """The last w - 1 inputs of cat([initial_state, x]) (as the reference's final state), computed
    from the tail only; differentiable in plain torch."""
    length = x.shape[2]
    if length >= w1:
        tail = x[..., length - w1:]
    else:
        state = x.new_zeros(x.shape[0], x.shape[1], w1) if initial_state is None else initial_state.to(x.dtype)
        tail = torch.cat([state, x], dim=-1)[..., -w1:] if w1 else x[..., :0]
    if starts is None:
        return tail
    positions = torch.arange(length - w1, length, device=x.device)  # negative: state entries
    keep = positions >= starts[:, -1:]  # (b, w - 1): inside the last token's sequence
    return tail * keep[:, None, :].to(tail.dtype)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation=None):
    """Triton path of :func:`mambakit.ops.conv1d.causal_conv1d_update` (validated; updates conv_state
    in place)."""
    b, d = x.shape
    y = torch.empty_like(x)
    block_d = 128
    kernels.conv1d_update_kernel[(cdiv(d, block_d), b)](
        x.contiguous(), conv_state, weight.contiguous(), bias, y, d, W=weight.shape[1], HAS_BIAS=bias is not None,
        SILU=activation is not None, BLOCK_D=block_d)
    return y
