"""Launchers of the Triton SSD kernels, registered as PyTorch custom ops (``torch.compile`` traces
through them without graph breaks) with their autograd formula."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._backend import cdiv, interpreting, next_power_of_2, sm_count
from .._checks import grad_needed
from .._compile import compile_ahead, launch
from ..common import canonical_segments
from . import triton_kernels as kernels

F32 = torch.float32
# Chunk 128 against 256 at Mamba-2's anchor (b8 l4096 h32 p64 n128, H200): forward 0.479 -> 0.413 ms
# and forward + backward 2.51 -> 2.13 ms of kernel time (the in-chunk quadratic work halves, the
# chunk states double); chunk 64 loses again (benchmarks/NOTES.md).
MAX_CHUNK = 128


def kernel_chunk(chunk_size: int) -> int:
    """The chunk the kernels use: the largest power of two <= chunk_size, within [16, 128].

    The chunk only decides where the kernels hand the state from one block of tokens to the next
    (the result is the same up to rounding); it must be a power of two for Triton's blocks."""
    return min(MAX_CHUNK, max(16, 1 << (chunk_size.bit_length() - 1)))


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


def _states_dtype(x: Tensor, per_token: bool = False) -> torch.dtype:
    """Chunk states (and their gradients) between kernels: bfloat16 for bfloat16 inputs (they
    enter the products in bfloat16 anyway), float32 otherwise (float16 could overflow) and in
    ``per_token`` mode (Mamba-3, whose phase gradients sum many state products: bfloat16 states
    cost them several times the error of the inputs' rounding)."""
    return torch.bfloat16 if x.dtype == torch.bfloat16 and not per_token else F32


def _narrow(x: Tensor, per_token: bool) -> bool:
    """Whether the kernels round float32 states to the inputs' bfloat16 for the tensor cores."""
    return x.dtype == torch.bfloat16 and not per_token


def _rows(t: Optional[Tensor]) -> tuple[int, int]:
    """(batch stride, token stride) of an input the kernels read in place; (0, 0) for None."""
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _packed_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """t itself if each token's row (the dims after b, l) is packed, else a contiguous copy."""
    if t is None:
        return None
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size > 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def _precision(x: Tensor) -> str:
    """fp32 inputs: exact fp32 products (as the reference); half inputs: the fp32 state products in tf32."""
    return "ieee" if x.dtype == F32 else "tf32"


# Launch parameters of each kernel (H100-tuned, see benchmarks/NOTES.md); block sizes are capped
# by the chunk and the padded p and n. benchmarks/tune_ssd.py overrides them to search.
CONFIGS = {
    "fwd_state": dict(BLOCK_T=128, BLOCK_P=64, BLOCK_N=128, num_warps=4, num_stages=2),
    "fwd_output": dict(BLOCK_M=64, BLOCK_K=16, BLOCK_P=64, HEADS=2, num_warps=4, num_stages=3),  # HEADS: 1 or 2
    "bwd_state": dict(BLOCK_T=128, BLOCK_P=64, BLOCK_N=128, num_warps=4, num_stages=2),
    "bwd_dx": dict(BLOCK_S=64, BLOCK_T=32, HEADS=4, num_warps=4, num_stages=1),
    "bwd_dc": dict(BLOCK_T=64, BLOCK_S=64, HEADS=4, num_warps=4, num_stages=1),
    "bwd_dt": dict(num_warps=4),
}
# Mamba-3's core (``per_token``): one head per group (the rotated keys differ per head), float32
# states, chunk 64 at its anchor; tuned by ``benchmarks/tune_ssd.py --op mamba3``.
PER_TOKEN_CONFIGS = {
    "fwd_state": dict(BLOCK_T=64, BLOCK_P=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "fwd_output": dict(BLOCK_M=64, BLOCK_K=16, BLOCK_P=64, HEADS=1, num_warps=4, num_stages=3),
    "bwd_state": dict(BLOCK_T=64, BLOCK_P=64, BLOCK_N=128, num_warps=4, num_stages=2),
    "bwd_dx": dict(BLOCK_S=64, BLOCK_T=32, HEADS=1, num_warps=4, num_stages=2),
    "bwd_dc": dict(BLOCK_T=32, BLOCK_S=32, HEADS=1, num_warps=4, num_stages=2),
    "bwd_dt": dict(num_warps=4),
}


def _launch(name: str, chunk: int, p: int, n: int, per_token: bool) -> dict:
    """The launch parameters of kernel ``name`` (from PER_TOKEN_CONFIGS for ``per_token``, else
    CONFIGS) with token blocks capped by the chunk and the p/n blocks by the padded sizes."""
    cfg = dict((PER_TOKEN_CONFIGS if per_token else CONFIGS)[name])
    for key in ("BLOCK_T", "BLOCK_M", "BLOCK_K", "BLOCK_S"):
        if key in cfg:
            cfg[key] = min(cfg[key], chunk)
    if "BLOCK_P" in cfg:
        cfg["BLOCK_P"] = min(cfg["BLOCK_P"], _pow2(p))
    if "BLOCK_N" in cfg:
        cfg["BLOCK_N"] = min(cfg["BLOCK_N"], _pow2(n))
    return cfg


# The forward state walk is sequential over chunks. When its (p-block, n-block, batch, head) programs
# leave SMs idle, the chunks are split into segments walked in parallel, each at least
# MIN_SEGMENT_CHUNKS chunks: as many segments as keep all programs in one wave of
# WALK_PROGRAMS_PER_SM per SM (the whole-n tile fits two at once on the H200). At b2 l16384 four
# segments (256 programs on 132 SMs) walk in 0.110 ms against 0.165 in two; three (192 programs,
# the SMs with two set the pace) took 0.147 when the walk still spilled (benchmarks/NOTES.md).
WALK_PROGRAMS_PER_SM = 2
MIN_SEGMENT_CHUNKS = 4
# The backward walk is split the same way. With the whole-n tile, at b2 l16384 four segments walk
# in 0.228 ms + 0.067 to add what enters them, against 0.432 unsplit (two segments at n-blocks of
# 64: 0.290 + 0.042; benchmarks/NOTES.md).
BWD_WALK_PROGRAMS_PER_SM = 2


def _segment_chunks(n_chunks: int, programs: int, device: torch.device, per_sm: int) -> int:
    """Chunks per segment of a state walk of ``programs`` programs (n_chunks: no split), as many
    segments as fit ``per_sm`` programs per SM in one wave. Under the interpreter
    three segments (of one chunk and up), so that CI runs the split, the entering states and their
    use on short sequences."""
    if interpreting():
        return max(1, cdiv(n_chunks, 3))
    if device.type != "cuda":
        return n_chunks
    slots = per_sm * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    segments = min(slots // programs, n_chunks // MIN_SEGMENT_CHUNKS)
    return cdiv(n_chunks, max(1, segments))


def _heads_per_program(cfg: dict, heads_per_group: int) -> int:
    """The largest divisor of the heads per group not above cfg["HEADS"]."""
    return max(k for k in range(1, min(cfg["HEADS"], heads_per_group) + 1) if heads_per_group % k == 0)


def _walk_plan(name: str, per_sm: int, x: Tensor, n: int, chunk: int, per_token: bool
               ) -> tuple[dict, int, int, int, int]:
    """(launch parameters, p-blocks, n-blocks, segments, chunks per segment) of state walk ``name``
    ("fwd_state" or "bwd_state", split at ``per_sm`` programs per SM) for x (b, l, h, p), state size n."""
    bsz, length, h, p = x.shape
    cfg = _launch(name, chunk, p, n, per_token)
    n_chunks = cdiv(length, chunk)
    p_blocks, n_blocks = cdiv(p, cfg["BLOCK_P"]), cdiv(n, cfg["BLOCK_N"])
    segment_chunks = _segment_chunks(n_chunks, p_blocks * n_blocks * bsz * h, x.device, per_sm)
    return cfg, p_blocks, n_blocks, cdiv(n_chunks, segment_chunks), segment_chunks


def _state_pass_tile(p: int, n: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N) of the elementwise passes over chunk states (completing them)."""
    return min(64, _pow2(p)), min(64, _pow2(n))


def _ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
            dt_bias: Optional[Tensor], h0: Optional[Tensor], seg: Optional[Tensor], dt_softplus: bool,
            dt_lo: float, dt_hi: float, clamp: bool, chunk: int, save: bool, per_token: bool = False,
            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (y (b, l, h, p) in x's dtype, final state (b, h, p, n) fp32, chunk-start states
    (b, n_chunks, h, p, n) (bf16 for bf16 inputs, else fp32), dt and in-chunk cumsum of dt A (b, h, l) fp32, the output
    before the z gate (b, l, h, p), empty unless ``save`` and z). Without ``save``, after a walk in segments, the
    chunk states of a later segment hold only what entered within it (the output kernel adds the rest); with it they
    are whole, as the backward reads them.

    ``per_token``: A is (b, l, h) contiguous, each token's log-decay itself (the state decays by
    exp(A_t), not exp(dt_t A)), and dt weighs the input as given (Mamba-3's core)."""
    compile_ahead("ssd", _forward_and_backward, x, dt, A, B, C, D, z, dt_bias, h0, seg, dt_softplus, dt_lo, dt_hi,
                  clamp, chunk, save, per_token)
    bsz, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    n_chunks = cdiv(length, chunk)
    states = x.new_empty(bsz, n_chunks, h, p, n, dtype=_states_dtype(x, per_token))
    final = x.new_empty(bsz, h, p, n, dtype=F32)
    dtp = x.new_empty(bsz, h, length, dtype=F32)
    cum = x.new_empty(bsz, h, length, dtype=F32)
    y = x.new_empty(x.shape)
    y_pre = x.new_empty(x.shape) if save and z is not None else x.new_empty(0)
    prec = _precision(x)
    cfg, p_blocks, n_blocks, segments, segment_chunks = _walk_plan("fwd_state", WALK_PROGRAMS_PER_SM, x, n, chunk,
                                                                   per_token)
    fold = segments > 1 and not save  # the output kernel adds what entered each later segment
    if segments == 1:
        seg_final, entry, kept = final, x.new_empty(0, dtype=states.dtype), x.new_empty(0, dtype=F32)
    else:
        seg_final = x.new_empty(bsz * h, segments, p, n, dtype=F32)
        entry = x.new_empty(bsz * h, segments, p, n, dtype=states.dtype)
        kept = x.new_empty(bsz * h, segments, segment_chunks, dtype=F32)
    launch(kernels.ssd_fwd_state_kernel,
        (p_blocks, n_blocks, bsz * h * segments),
        x, dt, A, dt_bias, B, h0, seg, states, seg_final, dtp, cum, length, n_chunks,
        dt_lo, dt_hi, *_rows(x), *_rows(dt), *_rows(B),
        H=h, G=g, P=p, N=n, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        HAS_H0=h0 is not None, HAS_SEQ=seg is not None, PER_TOKEN=per_token, CHUNK=chunk, PREC=prec,
        SEGMENTS=segments, SEGMENT_CHUNKS=segment_chunks, **cfg,
    )
    if segments > 1:
        launch(kernels.ssd_fwd_entry_kernel, (p_blocks * n_blocks, bsz * h),
            seg_final, cum, seg, entry, final, kept, length, n_chunks, H=h, P=p, N=n, CHUNK=chunk,
            SEGMENTS=segments, SEGMENT_CHUNKS=segment_chunks, CHUNKS_BLOCK=next_power_of_2(segment_chunks),
            HAS_SEQ=seg is not None, BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"])
        if save:  # the backward reads whole states: complete the later segments' in place now
            block_p, block_n = _state_pass_tile(p, n)
            launch(kernels.ssd_complete_states_kernel,
                (cdiv(p, block_p) * cdiv(n, block_n), n_chunks - segment_chunks, bsz * h),
                states, entry, kept, states, n_chunks, segments, segment_chunks, segment_chunks, H=h, P=p, N=n,
                BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    cfg = _launch("fwd_output", chunk, p, n, per_token)
    cfg["HEADS"] = _heads_per_program(dict(cfg, HEADS=min(cfg["HEADS"], 2)), h // g)  # the kernel takes 1 or 2
    grid = (n_chunks * (chunk // cfg["BLOCK_M"]), cdiv(p, cfg["BLOCK_P"]), bsz * h // cfg["HEADS"])
    launch(kernels.ssd_fwd_output_kernel, grid,
        x, B, C, D, z, seg, states, entry, kept, dtp, cum, y, y_pre, length, n_chunks, segments, segment_chunks,
        *_rows(x), *_rows(B), *_rows(C), *_rows(z),
        H=h, G=g, P=p, N=n, NP=_pow2(n), HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2,
        HAS_Z=z is not None, SAVE_PRE=y_pre.numel() > 0, HAS_SEQ=seg is not None, CHUNK=chunk, PREC=prec,
        NARROW=_narrow(x, per_token), SPLIT=fold, **cfg,
    )
    return y, final, states, dtp, cum, y_pre


ssd_fwd = torch.library.custom_op("mambakit::ssd_fwd", _ssd_fwd, mutates_args=())


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, h0, seg, dt_softplus, dt_lo, dt_hi, clamp, chunk, save, per_token=False):
    bsz, length, h, p = x.shape
    n = B.shape[3]
    n_chunks = cdiv(length, chunk)
    y_pre_shape = x.shape if save and z is not None else (0,)
    states_dtype = _states_dtype(x, per_token)
    return (x.new_empty(x.shape), x.new_empty(bsz, h, p, n, dtype=F32), x.new_empty(bsz, n_chunks, h, p, n, dtype=states_dtype),
            x.new_empty(bsz, h, length, dtype=F32), x.new_empty(bsz, h, length, dtype=F32), x.new_empty(y_pre_shape))


def _ssd_bwd(dout: Tensor, dfinal: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Optional[Tensor], z: Optional[Tensor], dt_bias: Optional[Tensor], h0: Optional[Tensor],
            seg: Optional[Tensor], states: Tensor, dtp: Tensor, cum: Tensor, y_pre: Tensor,
            dt_softplus: bool, dt_lo: float, dt_hi: float, clamp: bool, chunk: int,
            per_token: bool = False) -> list[Tensor]:
    """-> [dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0], absent inputs' gradients empty (dA per
    token for ``per_token``); states (whole) as the forward saved them."""
    bsz, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    n_chunks = states.shape[1]
    dev = x.device
    prec = _precision(x)
    dstates = torch.empty_like(states)
    dh0 = torch.empty(bsz, h, p, n, device=dev, dtype=F32) if h0 is not None else x.new_empty(0, dtype=F32)
    dy = x.new_empty(x.shape) if z is not None else dout  # dL/d(SSD output before D and the gate)
    dz = z.new_empty(z.shape) if z is not None else x.new_empty(0)
    dD = torch.zeros(h, p, device=dev, dtype=F32)
    cfg, p_blocks, n_blocks, segments, segment_chunks = _walk_plan("bwd_state", BWD_WALK_PROGRAMS_PER_SM, x, n, chunk,
                                                                   per_token)
    seg_final = torch.empty(bsz * h, segments, p, n, device=dev, dtype=F32) if segments > 1 else dh0
    launch(kernels.ssd_bwd_state_kernel, (p_blocks, n_blocks, bsz * h * segments),
        dout, x, A, C, z, y_pre, seg, dtp, dfinal, dstates, dh0, seg_final, dy, dz, dD, length, n_chunks,
        *_rows(x), *_rows(C), *_rows(z),
        H=h, G=g, P=p, N=n, HAS_D=D is not None, HAS_Z=z is not None, HAS_DLAST=dfinal is not None,
        HAS_H0=h0 is not None, HAS_SEQ=seg is not None, PER_TOKEN=per_token, CHUNK=chunk, PREC=prec,
        SEGMENTS=segments, SEGMENT_CHUNKS=segment_chunks, **cfg,
    )
    if segments > 1:  # add what enters each segment from the later ones
        entering = torch.empty_like(seg_final)
        split = dict(H=h, P=p, N=n, CHUNK=chunk, SEGMENTS=segments, SEGMENT_CHUNKS=segment_chunks,
                     CHUNKS_BLOCK=next_power_of_2(segment_chunks), HAS_SEQ=seg is not None)
        launch(kernels.ssd_bwd_entry_kernel, (p_blocks * n_blocks, bsz * h),
            seg_final, cum, seg, entering, dh0, length, HAS_H0=h0 is not None,
            BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], **split)
        block_p, block_n = _state_pass_tile(p, n)
        launch(kernels.ssd_bwd_complete_kernel,
            (cdiv(p, block_p) * cdiv(n, block_n), (segments - 1) * segment_chunks, bsz * h),
            dstates, entering, cum, seg, length, n_chunks, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4, **split)
    dx = x.new_empty(x.shape)
    ddt_direct = torch.empty(bsz, h, length, device=dev, dtype=F32)
    dcum_src, dcum_dst = torch.empty_like(ddt_direct), torch.empty_like(ddt_direct)
    chunk_const = torch.zeros(bsz, h, n_chunks, device=dev, dtype=F32)
    common = dict(H=h, G=g, P=p, N=n, PP=_pow2(p), NP=_pow2(n), HAS_SEQ=seg is not None, CHUNK=chunk, PREC=prec,
                  NARROW=_narrow(x, per_token))

    def group_grad(heads):
        """dB/dC target (b, l, g, n): B's dtype when a program takes all heads of a group, else
        zeroed float32 that the programs of a group add into."""
        return B.new_empty(B.shape) if heads == h // g else torch.zeros(B.shape, device=dev, dtype=F32)

    cfg = _launch("bwd_dx", chunk, p, n, per_token)
    cfg["HEADS"] = _heads_per_program(cfg, h // g)
    dB = group_grad(cfg["HEADS"])
    launch(kernels.ssd_bwd_dx_kernel, (n_chunks * (chunk // cfg["BLOCK_S"]), bsz * h // cfg["HEADS"]),
        x, B, C, D, seg, dtp, cum, dy, dstates, dx, dB, ddt_direct, dcum_src, chunk_const, length, n_chunks,
        *_rows(x), *_rows(B), *_rows(C),
        HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, **common, **cfg,
    )
    cfg = _launch("bwd_dc", chunk, p, n, per_token)
    cfg["HEADS"] = _heads_per_program(cfg, h // g)
    dC = group_grad(cfg["HEADS"])
    launch(kernels.ssd_bwd_dc_kernel, (n_chunks * (chunk // cfg["BLOCK_T"]), bsz * h // cfg["HEADS"]),
        x, B, C, seg, dtp, cum, dy, states, dstates, dC, dcum_dst, chunk_const, length, n_chunks,
        *_rows(x), *_rows(B), *_rows(C), **common, **cfg,
    )
    ddt = dt.new_empty(dt.shape)
    dA = torch.empty(A.shape, device=dev, dtype=F32) if per_token else torch.zeros(h, device=dev, dtype=F32)
    dbias = torch.zeros(h if dt_bias is not None else 1, device=dev, dtype=F32)
    launch(kernels.ssd_bwd_dt_kernel, (n_chunks, bsz * h),
        dt, A, dt_bias, dtp, ddt_direct, dcum_src, dcum_dst, chunk_const, ddt, dA, dbias, length, n_chunks,
        dt_lo, dt_hi, *_rows(dt), H=h, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        PER_TOKEN=per_token, CHUNK=chunk, **_launch("bwd_dt", chunk, p, n, per_token),
    )

    def empty():  # a fresh tensor each time: custom-op outputs must not alias each other
        return x.new_empty(0)

    dB, dC = dB.to(B.dtype), dC.to(C.dtype)
    if D is not None:
        dD = (dD if D.dim() == 2 else dD.sum(1)).to(D.dtype)
    return [
        dx, ddt, dA.to(A.dtype), dB, dC, dD if D is not None else empty(), dz,
        dbias.to(dt_bias.dtype) if dt_bias is not None else empty(),
        dh0.to(h0.dtype) if h0 is not None else empty(),
    ]


ssd_bwd = torch.library.custom_op("mambakit::ssd_bwd", _ssd_bwd, mutates_args=())


def _forward_and_backward(x, dt, A, B, C, D, z, dt_bias, h0, seg, dt_softplus, dt_lo, dt_hi, clamp, chunk, save,
                          per_token):
    """Every launch of a forward and, when it saves for one, of its backward (for compile_ahead)."""
    y, final, states, dtp, cum, y_pre = _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, h0, seg, dt_softplus, dt_lo, dt_hi,
                                                 clamp, chunk, save, per_token)
    if save:  # autograd hands the backward zeros for an unused final state, so a dfinal always comes
        _ssd_bwd(torch.empty_like(y), torch.empty_like(final), x, dt, A, B, C, D, z, dt_bias, h0, seg, states, dtp,
                 cum, y_pre, dt_softplus, dt_lo, dt_hi, clamp, chunk, per_token)


@ssd_bwd.register_fake
def _(dout, dfinal, x, dt, A, B, C, D, z, dt_bias, h0, seg, states, dtp, cum, y_pre, dt_softplus, dt_lo, dt_hi, clamp,
      chunk, per_token=False):
    def like(t):
        return t.new_empty(t.shape) if t is not None else x.new_empty(0)

    return [like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias), like(h0)]


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, h0, seg, dt_softplus, dt_lo, dt_hi, clamp, chunk, save, per_token = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, seg, *output[2:])
    ctx.options = (dt_softplus, dt_lo, dt_hi, clamp, chunk, per_token)


def _backward(ctx, dy, dfinal, _dstates, _ddtp, _dcum, _dy_pre):
    x, dt, A, B, C, D, z, dt_bias, h0, seg, states, dtp, cum, y_pre = ctx.saved_tensors
    if z is not None and y_pre.numel() == 0:
        raise RuntimeError("ssd: the forward ran without saving for backward (no input required grad)")
    grads = ssd_bwd(dy.contiguous(), None if dfinal is None else dfinal.contiguous(), x, dt, A, B, C, D, z, dt_bias,
                    h0, seg, states, dtp, cum, y_pre, *ctx.options)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = grads
    return (dx, ddt, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if dt_bias is not None else None, dh0 if h0 is not None else None,
            None, None, None, None, None, None, None, None)


ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


def ssd_triton(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
               dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None, return_final_states=False):
    """Triton path of :func:`mambakit.ops.ssd` (inputs already validated)."""
    def c(t):
        return None if t is None else t.contiguous()

    x, dt, B, C, z = (_packed_rows(t) for t in (x, dt, B, C, z))

    tensors = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    save = grad_needed(*tensors)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = (lo, hi) != (0.0, float("inf"))
    seg = None if seq_idx is None else canonical_segments(seq_idx)
    y, final, *_ = ssd_fwd(x, dt, c(A), B, C, c(D), z, c(dt_bias), c(initial_states), seg,
                           dt_softplus, lo, hi, clamp, kernel_chunk(chunk_size), save)
    return (y, final) if return_final_states else y
