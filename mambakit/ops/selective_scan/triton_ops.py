"""Launchers of the Triton selective scan, registered as PyTorch custom ops (so ``torch.compile``
traces through them without graph breaks) with their autograd formula."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .._backend import cdiv, next_power_of_2, sm_count
from .._checks import grad_needed
from .._compile import compile_ahead, launch
from . import triton_complex as complex_kernels
from . import triton_kernels as kernels

F32 = torch.float32
# Forward programs (channel blocks x chunks) per SM that the time split aims for. The sweep of
# benchmarks/tune_selective_scan.py on an H100 was fastest at 1024-token chunks for both benchmark
# shapes (b8 d2048 l4096: 2048 programs of 2 warps; b1 d2048 l65536: 4096); 24 per SM with at
# least 1024 tokens picks those.
_PROGRAMS_PER_SM = 24
_MAX_CHUNKS = 128
# Below this many forward programs per SM the chunks shrink under 1024 tokens, down to
# _MIN_SHORT_CHUNK: a 2048-token prefill of 1536 channels at batch 1 ran as 96 programs of
# 1024-token chunks (0.48 ms a layer on an H100, most SMs idle).
_FEW_PROGRAMS_PER_SM = 4
_MIN_SHORT_CHUNK = 128


@dataclass(frozen=True)
class Plan:
    """Launch parameters. The forward walks tiles of ``fwd_block_l`` tokens (8 tokens per thread
    and channel; longer tiles put a channel on several lanes) over ``fwd_block_d`` channels; the
    backward walks tiles of ``save_every`` tokens, whose end states the forward stores. Each
    program covers ``fwd_chunk`` (``bwd_chunk``) tokens: splitting the sequence over programs
    gives the GPU enough of them when there are few channels, for one extra pass over the inputs
    (the chunks' end states, combined by the programs of the main pass). Both chunks are
    multiples of ``save_every``, itself a multiple of ``fwd_block_l``. ``fwd_groups`` > 1 splits
    the state entries of the forward's main kernel over that many warps (more warps per channel
    block without splitting the sequence). ``bwd_stages`` > 1 lets
    Triton's software pipeliner prefetch the backward's per-entry loads (B and C rows, start
    states, carries) that many entries ahead, through shared memory. (Pipelining the forward's
    tile loop does not pay: 255 registers and spills with Triton 3.6.)"""

    fwd_block_l: int
    fwd_block_d: int
    fwd_warps: int
    save_every: int
    bwd_block_d: int
    bwd_warps: int
    fwd_chunk: int = 1 << 30
    bwd_chunk: int = 1 << 30
    bwd_stages: int = 1
    fwd_groups: int = 1

    def __post_init__(self):
        if self.save_every % self.fwd_block_l or self.fwd_chunk % self.save_every or self.bwd_chunk % self.save_every:
            raise ValueError(f"Plan: chunks must be multiples of save_every, itself of fwd_block_l; got {self}")


def plan(batch: int, dim: int, length: int, save_states: bool = False) -> Plan:
    """The launch parameters for a (batch, dim, length) scan, from the shape alone (and whether
    the forward saves states for a backward): the forward and the backward of one call must agree
    on ``save_every``, which does not depend on ``save_states``."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":  # CI on CPU: small blocks, several programs
        return Plan(fwd_block_l=8, fwd_block_d=4, fwd_warps=1, save_every=16, bwd_block_d=4, bwd_warps=1,
                    fwd_chunk=32, bwd_chunk=32, fwd_groups=2)
    # From the sweeps (benchmarks/results/tune_selective_scan*.json). Forward: 32 channels of
    # 8-token tiles (the scan stays in each thread), the state entries split over 2 warps. The
    # sequence is split into the longest power-of-two chunks, of at least 1024 tokens (512 for
    # sequences of 1025-2048: b8 l2048 on an H200, d1536 / d2048, 0.58 / 0.60 ms against 0.64 /
    # 0.67), that still give every SM _PROGRAMS_PER_SM programs, at most _MAX_CHUNKS (each program
    # combines the end states of the chunks before it); but a forward that saves states is not
    # split when the channel blocks alone give 5 warps per SM (b8 d2048 l4096: 1.37 ms unsplit,
    # 1.66 split; b8 d1536 l2048 on an H200: 0.61 against 0.67). Backward: 8 channels of 32-token
    # tiles, its entry loop's loads prefetched 2 entries ahead (3 stages), 512-token chunks (its
    # programs do ~5x the work per token), unsplit for sequences of up to 2048 tokens when the
    # channel blocks alone give 15 programs per SM (H200, b8 d2048 l2048: 2.07 ms against 2.41;
    # b8 d1536, 12 per SM: 1.86 against 1.79; longer sequences not measured). Short sequences with
    # few channels go below 1024-token chunks (_FEW_PROGRAMS_PER_SM).
    sms = sm_count(torch.cuda.current_device())
    groups = 2
    channel_blocks = cdiv(batch * dim, 32)

    def whole_if_longer(tokens: int) -> int:
        return tokens if tokens < length else 1 << 30  # one chunk: one compiled variant for all lengths

    fwd_tokens = next_power_of_2(max(length, 1024))
    min_chunk = 512 if 1024 < length <= 2048 else 1024
    if not (save_states and channel_blocks * groups >= 5 * sms):
        while (fwd_tokens > min_chunk and cdiv(length, fwd_tokens) < _MAX_CHUNKS
               and channel_blocks * cdiv(length, fwd_tokens) < _PROGRAMS_PER_SM * sms):
            fwd_tokens //= 2
        while (fwd_tokens > _MIN_SHORT_CHUNK and 2 * cdiv(length, fwd_tokens) <= _MAX_CHUNKS
               and channel_blocks * cdiv(length, fwd_tokens) < _FEW_PROGRAMS_PER_SM * sms):
            fwd_tokens //= 2
    bwd_tokens = max(512, next_power_of_2(cdiv(length, _MAX_CHUNKS)))
    if length <= 2048 and cdiv(batch * dim, 8) >= 15 * sms:
        bwd_tokens = length
    return Plan(fwd_block_l=8, fwd_block_d=32, fwd_warps=1, save_every=32, bwd_block_d=8, bwd_warps=1,
                fwd_chunk=whole_if_longer(fwd_tokens), bwd_chunk=whole_if_longer(bwd_tokens), bwd_stages=3,
                fwd_groups=groups)


def _layout(X: Tensor, d: int) -> tuple[bool, bool, int]:
    """(variable, grouped, channels per group) of a B or C tensor."""
    if X.dim() == 2:
        return False, False, d
    if X.dim() == 3 or X.shape[1] == 1:
        return True, False, d
    return True, True, d // X.shape[1]


def _padded(n: int) -> int:
    return max(2, next_power_of_2(n))


def _fp32(X: Optional[Tensor]) -> Optional[Tensor]:
    """B, C (or a complex A / state) as contiguous float32, complex tensors viewed as real with a
    trailing (re, im) axis; a no-op when already so. The kernels read every B/C entry in every
    thread, and a conversion there would cost more than this small copy."""
    if X is None:
        return None
    if X.is_complex():
        return torch.view_as_real(X.to(torch.complex64).resolve_conj().contiguous())
    return X.to(F32).contiguous()


def _strides(t: Optional[Tensor]) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else (t.stride(0), t.stride(1), t.stride(2))


def _time_rows(x: Optional[Tensor]) -> Optional[Tensor]:
    """x (b, d, l) itself when time is its unit stride (any batch and channel strides), else a
    contiguous copy (see :func:`selective_scan_triton`)."""
    if x is None or x.stride(2) == 1 or x.shape[2] == 1:
        return x
    return x.contiguous()


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill its storage span without gaps or overlaps in some axis order (so
    ``empty_like(t)`` has t's strides)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _scan_rows(u: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """u and delta (b, d, l) in place when they share dense strides with time as the unit stride
    (contiguous, or channel-major: memory (d, b, l), as the Mamba-1 layer's projections give),
    else both contiguous. The kernels address u, delta and every (b, d, l) output through u's
    strides, and the outputs are allocated ``empty_like(u)``."""
    if u.stride(2) == 1 and u.stride() == delta.stride() and _dense(u):
        return u, delta
    return u.contiguous(), delta.contiguous()


def _state(shape: tuple, complex_a: bool, device, zeros: bool = False) -> Tensor:
    """An fp32 state-shaped buffer, with a trailing (re, im) axis for a complex A."""
    shape = shape + (2,) if complex_a else shape
    return (torch.zeros if zeros else torch.empty)(shape, device=device, dtype=F32)


def _as_state(buffer: Tensor, complex_a: bool) -> Tensor:
    return torch.view_as_complex(buffer) if complex_a else buffer


def _selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       z: Optional[Tensor], delta_bias: Optional[Tensor], h0: Optional[Tensor],
                       seq_idx: Optional[Tensor], delta_softplus: bool, save_states: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y (b, d, l) in u's dtype, h_last (b, d, n) fp32, chunk-end states (b, d, n_chunks, n)
    fp32 and the output before the z gate (b, d, l); the last two are empty unless
    ``save_states`` (and z, for the last). u and delta as :func:`_scan_rows` leaves them
    (contiguous for a complex A), z any strides (fastest with time as the unit stride); y and the
    output before the gate in u's layout."""
    compile_ahead("selective_scan", _forward_and_backward, u, delta, A, B, C, D, z, delta_bias, h0, seq_idx,
                  delta_softplus, save_states)
    bsz, d, length = u.shape
    n = A.shape[1]
    p = plan(bsz, d, length, save_states)
    n_saved = cdiv(length, p.save_every)
    y = torch.empty_like(u)
    cplx = A.is_complex()
    last = _state((bsz, d, n), cplx, u.device)
    states = _state((bsz, d, n_saved, n), cplx, u.device) if save_states else u.new_empty(0, dtype=F32)
    y_pre = torch.empty_like(u) if save_states and z is not None else u.new_empty(0)
    b_var, b_grp, b_pg = _layout(B, d)
    c_var, c_grp, c_pg = _layout(C, d)
    B32, C32 = _fp32(B), _fp32(C)
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus, HAS_SEQ=seq_idx is not None,
                 B_VARIABLE=b_var, B_GROUPED=b_grp, N=n, NP=_padded(n), BLOCK_L=p.fwd_block_l, BLOCK_D=p.fwd_block_d,
                 HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None, SAVE_STATES=save_states,
                 C_VARIABLE=c_var, C_GROUPED=c_grp, SAVE_EVERY=p.save_every)
    d_blocks = cdiv(d, p.fwd_block_d)
    if cplx:
        z = None if z is None else z.contiguous()  # the complex kernels read z time-contiguous
        launch(complex_kernels.selective_scan_complex_fwd_kernel, (d_blocks, bsz),
            u, delta, _fp32(A), B32, C32, D, z, delta_bias, _fp32(h0), seq_idx, y, y_pre, last, states,
            d, length, b_pg, c_pg, n_saved, **flags, num_warps=p.fwd_warps)
        return y, _as_state(last, cplx), states, y_pre
    n_chunks = cdiv(length, p.fwd_chunk)
    chunk_h = chunk_decay = u.new_empty(0, dtype=F32)
    if n_chunks > 1:  # the end state and decay of every chunk but the last
        chunk_h, chunk_decay = (torch.empty(bsz, n_chunks, d, n, device=u.device, dtype=F32) for _ in range(2))
        launch(kernels.selective_scan_chunk_state_kernel, (d_blocks, bsz, n_chunks - 1),
            u, delta, A, B32, delta_bias, seq_idx, chunk_h, chunk_decay, d, length, b_pg, n_chunks, *_strides(u),
            HAS_BIAS=flags["HAS_BIAS"], SOFTPLUS=delta_softplus, HAS_SEQ=flags["HAS_SEQ"], B_VARIABLE=b_var,
            B_GROUPED=b_grp, N=n, NP=flags["NP"], BLOCK_L=p.fwd_block_l, BLOCK_D=p.fwd_block_d, CHUNK=p.fwd_chunk,
            num_warps=p.fwd_warps)
    groups = min(p.fwd_groups, flags["NP"])  # groups of state entries, a warp (or fwd_warps) each
    launch(kernels.selective_scan_fwd_kernel, (d_blocks, bsz, n_chunks),
        u, delta, A, B32, C32, D, z, delta_bias, h0, seq_idx, y, y_pre, last, states, chunk_h, chunk_decay,
        d, length, b_pg, c_pg, n_saved, n_chunks, *_strides(u), *_strides(z), **flags, G=groups, CHUNK=p.fwd_chunk,
        num_warps=p.fwd_warps * groups)
    return y, last, states, y_pre


selective_scan_fwd = torch.library.custom_op("mambakit::selective_scan_fwd", _selective_scan_fwd, mutates_args=())


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, save_states):
    bsz, d, length = u.shape
    n = A.shape[1]
    states_shape = (bsz, d, cdiv(length, plan(bsz, d, length).save_every), n) if save_states else (0,)
    if save_states and A.is_complex():
        states_shape += (2,)
    y_pre = torch.empty_like(u) if save_states and z is not None else u.new_empty(0)
    last_dtype = torch.complex64 if A.is_complex() else F32
    return torch.empty_like(u), u.new_empty(bsz, d, n, dtype=last_dtype), u.new_empty(states_shape, dtype=F32), y_pre


def _selective_scan_bwd(dy: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], h0: Optional[Tensor],
                       seq_idx: Optional[Tensor], states: Tensor, y_pre: Tensor, delta_softplus: bool) -> list[Tensor]:
    """-> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0], absent inputs' gradients empty; du,
    ddelta and dz in u's layout (inputs as for the forward, dy any strides)."""
    bsz, d, length = u.shape
    n = A.shape[1]
    p = plan(bsz, d, length)
    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dz = torch.empty_like(u, dtype=z.dtype) if z is not None else u.new_empty(0)  # (distinct from the other empties)
    # Reductions over channels, batch or time are accumulated atomically in fp32.
    cplx = A.is_complex()
    dA = _state(tuple(A.shape), cplx, u.device, zeros=True)
    dB = _state(tuple(B.shape), B.is_complex(), u.device, zeros=True)
    dC = _state(tuple(C.shape), C.is_complex(), u.device, zeros=True)
    dD = torch.zeros(d if D is not None else 1, device=u.device, dtype=F32)
    dbias = torch.zeros(d if delta_bias is not None else 1, device=u.device, dtype=F32)
    dh0 = _state((bsz, d, n), cplx, u.device) if h0 is not None else u.new_empty(0, dtype=F32)
    b_var, b_grp, b_pg = _layout(B, d)
    c_var, c_grp, c_pg = _layout(C, d)
    B32, C32 = _fp32(B), _fp32(C)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                 HAS_H0=h0 is not None, HAS_SEQ=seq_idx is not None, HAS_DLAST=dlast is not None,
                 B_VARIABLE=b_var, C_VARIABLE=c_var, B_GROUPED=b_grp, C_GROUPED=c_grp,
                 N=n, NP=_padded(n), BLOCK_L=p.save_every, BLOCK_D=p.bwd_block_d)
    d_blocks = cdiv(d, p.bwd_block_d)
    n_saved = cdiv(length, p.save_every)
    if cplx:
        dy, z = dy.contiguous(), None if z is None else z.contiguous()  # time-contiguous, as above
        launch(complex_kernels.selective_scan_complex_bwd_kernel, (d_blocks, bsz),
            u, delta, _fp32(A), B32, C32, D, z, delta_bias, _fp32(h0), seq_idx, states, y_pre, dy, _fp32(dlast),
            du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, d, length, b_pg, c_pg, n_saved,
            **flags, num_warps=p.bwd_warps)
    else:
        n_chunks = cdiv(length, p.bwd_chunk)
        chunk_g = chunk_decay = u.new_empty(0, dtype=F32)
        if n_chunks > 1:  # the zero-end adjoint and decay of every chunk but the first
            chunk_g, chunk_decay = (torch.empty(bsz, n_chunks, d, n, device=u.device, dtype=F32) for _ in range(2))
            launch(kernels.selective_scan_chunk_adjoint_kernel, (d_blocks, bsz, n_chunks - 1),
                delta, A, C32, z, delta_bias, seq_idx, dy, chunk_g, chunk_decay, d, length, c_pg, n_chunks,
                *_strides(u), *_strides(z), *_strides(dy),
                HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                HAS_SEQ=seq_idx is not None, C_VARIABLE=c_var, C_GROUPED=c_grp, N=n, NP=flags["NP"],
                BLOCK_L=p.save_every, BLOCK_D=p.bwd_block_d, CHUNK=p.bwd_chunk, num_warps=p.bwd_warps)
        # Per program: the adjoint after its tile and its dA (dB, dC) sums, one state entry at a time.
        carry = torch.empty(bsz, n_chunks, 4, d, n, device=u.device, dtype=F32)
        launch(kernels.selective_scan_bwd_kernel, (d_blocks, bsz, n_chunks),
            u, delta, A, B32, C32, D, z, delta_bias, h0, seq_idx, states, y_pre, dy, dlast,
            du, ddelta, dA, dB, dC, dD, dz, dbias, dh0, chunk_g, chunk_decay, carry,
            d, length, b_pg, c_pg, n_saved, n_chunks, *_strides(u), *_strides(z), *_strides(dy),
            **flags, CHUNK=p.bwd_chunk, STAGES=p.bwd_stages, num_warps=p.bwd_warps)

    def empty():  # a fresh tensor each time: custom-op outputs must not alias each other
        return u.new_empty(0)

    return [
        du, ddelta, _as_state(dA, cplx).to(A.dtype), _as_state(dB, B.is_complex()).to(B.dtype),
        _as_state(dC, C.is_complex()).to(C.dtype),
        dD.to(D.dtype) if D is not None else empty(), dz,
        dbias.to(delta_bias.dtype) if delta_bias is not None else empty(),
        _as_state(dh0, cplx).to(h0.dtype) if h0 is not None else empty(),
    ]


selective_scan_bwd = torch.library.custom_op("mambakit::selective_scan_bwd", _selective_scan_bwd, mutates_args=())


def _forward_and_backward(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, save_states):
    """Every launch of a forward and, when it saves for one, of its backward (for compile_ahead)."""
    y, last, states, y_pre = _selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus,
                                                 save_states)
    if save_states:  # autograd hands the backward zeros for an unused final state, so a dlast always comes
        _selective_scan_bwd(torch.empty_like(y), torch.empty_like(last), u, delta, A, B, C, D, z, delta_bias, h0,
                            seq_idx, states, y_pre, delta_softplus)


@selective_scan_bwd.register_fake
def _(dy, dlast, u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, states, y_pre, delta_softplus):
    def like(t):
        return torch.empty_like(t) if t is not None else u.new_empty(0)

    dz = torch.empty_like(u, dtype=z.dtype) if z is not None else u.new_empty(0)
    return [like(u), like(delta), like(A), like(B), like(C), like(D), dz, like(delta_bias), like(h0)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, delta_softplus, save_states = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, output[2], output[3])
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dy, dlast, _dstates, _dy_pre):
    u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, states, y_pre = ctx.saved_tensors
    if states.numel() == 0:
        raise RuntimeError("selective_scan: the forward ran without saving for backward (no input required grad)")
    grads = selective_scan_bwd(_time_rows(dy), None if dlast is None else dlast.contiguous(), u, delta, A, B, C, D,
                               z, delta_bias, h0, seq_idx, states, y_pre, ctx.delta_softplus)
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = grads
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz if z is not None else None,
            dbias if delta_bias is not None else None, dh0 if h0 is not None else None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("mambakit::selective_scan_step", mutates_args=())
def selective_scan_step(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                        z: Optional[Tensor], delta_bias: Optional[Tensor], h0: Optional[Tensor],
                        delta_softplus: bool) -> tuple[Tensor, Tensor]:
    """One decode token, u (b, d, 1) -> (y (b, d, 1), new state (b, d, n) fp32); no gradient."""
    bsz, d, _ = u.shape
    n = A.shape[1]
    y = torch.empty_like(u)
    last = torch.empty(bsz, d, n, device=u.device, dtype=F32)
    b_var, b_grp, b_pg = _layout(B, d)
    c_var, c_grp, c_pg = _layout(C, d)
    block_d = 32
    kernels.selective_scan_step_kernel[(cdiv(d, block_d), bsz)](
        u, delta, A, B, C, D, z, delta_bias, h0, y, last, d, b_pg, c_pg,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=h0 is not None, B_VARIABLE=b_var, C_VARIABLE=c_var, B_GROUPED=b_grp, C_GROUPED=c_grp,
        N=n, NP=_padded(n), BLOCK_D=block_d,
    )
    return y, last


@selective_scan_step.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, h0, delta_softplus):
    return torch.empty_like(u), u.new_empty(u.shape[0], u.shape[1], A.shape[1], dtype=F32)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          initial_state=None, return_final_state=False, seq_idx=None):
    """Triton path of :func:`mambakit.ops.selective_scan` (inputs already validated).

    A single token without gradients (decoding) with a real A takes the one-step kernel;
    everything else the tiled scan. Its kernels take any strides, but Triton lays their register
    tiles out after the loads: with channel-last inputs (memory (b, l, d)) the scan over time
    crossed lanes and ran 3.5x slower than copying them first (11.6 against 3.3 ms forward +
    backward at a 130M-class Mamba-1 shape on an H100, benchmarks/bench_scan_layouts.py). So u
    and delta are read in place only when they share one dense layout with time as the unit
    stride (contiguous or channel-major, memory (d, b, l); y and their gradients come back in it)
    and are copied to contiguous otherwise; z and the output gradient are read in place when time
    is their unit stride (a column slice of a (b, 2d, l) tensor, say) and copied otherwise."""
    def c(t):
        return None if t is None else t.contiguous()

    tensors = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    save_states = grad_needed(*tensors)
    if u.shape[2] == 1 and not save_states and not A.is_complex():
        y, last = selective_scan_step(c(u), c(delta), c(A), c(B), c(C), c(D), c(z), c(delta_bias),
                                      c(initial_state), delta_softplus)
        return (y, last) if return_final_state else y
    u, delta = (c(u), c(delta)) if A.is_complex() else _scan_rows(u, delta)  # complex kernels: contiguous only
    y, last, _, _ = selective_scan_fwd(u, delta, c(A), c(B), c(C), c(D), _time_rows(z), c(delta_bias),
                                       c(initial_state), c(seq_idx), delta_softplus, save_states)
    return (y, last) if return_final_state else y
