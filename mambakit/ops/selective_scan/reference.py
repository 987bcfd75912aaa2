"""Selective scan (Mamba-1, S6), MATH.md section 2.

    Delta = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t[c, :] = exp(Delta_t[c] A[c, :]) * h_{t-1}[c, :] + Delta_t[c] B_t[c, :] u_t[c]
    y_t[c]    = <C_t[c, :], h_t[c, :]> + D[c] u_t[c];   y *= silu(z) if z given

Two algorithms compute the same function:
- ``recurrent``: one step per token, the definition written out;
- ``chunked``: the whole recurrence as one elementwise linear scan over time
  (:func:`linear_scan`, ``method="chunked"``), run over blocks of channels so that the
  (b, channels, n, l) intermediates stay cache-sized and at most a few exist at once; below
  4096 tokens it scans time-major blocks token by token instead (``method="sequential"``,
  faster there on a CPU).

Conventions follow the official ``mamba_ssm.selective_scan_fn``. With complex A the state is
complex and y takes 2 Re(<C_t, h_t>) (the state stands for a conjugate pair); <C, h> is
sum_n C_n h_n with no conjugation. Time-invariant complex B/C are complex (d, n) tensors, variable
and grouped complex B/C are real tensors with real and imaginary parts interleaved along the
length axis: (b, n, 2l) / (b, g, n, 2l), element 2t is Re B_t and 2t + 1 is Im B_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    compute_dtype,
    expect_choice,
    expect_same_device,
    expect_shape,
    expect_tensor,
    grad_needed,
)
from ..common.decay import decay_exp, decay_exp_
from ..common.segments import segment_resets
from ..scan import linear_scan

COMPLEX_DTYPES = (torch.complex64, torch.complex128)
ALGORITHMS = ("chunked", "recurrent")

# The chunked path works on blocks of about this many state elements (b * channels * n * l):
# the decay, drive and state of a block then stay in cache between the elementwise passes and the
# scan, which on CPU is ~4x faster than whole-tensor passes (measured at b=1, d=1536, l=4096,
# n=16) and bounds the peak memory.
_BLOCK_ELEMENTS = 1 << 20


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    return_final_state: bool = False,
    algorithm: str = "chunked",
    seq_idx: torch.Tensor | None = None,
):
    """Mamba-1 selective scan (S6) with a diagonal real or complex A (MATH.md section 2).

    Shapes: b batch, d channels, l length, n state size, g groups of channels sharing B/C.
    Activations may be float16, bfloat16, float32 or float64; parameters (A, D, delta_bias) may
    have a different float dtype than u (e.g. fp32 parameters with bf16 activations). State math
    runs in float32, or float64 if any input is float64 (or complex128).

    Args:
        u: (b, d, l) input, float dtype.
        delta: (b, d, l) step sizes before bias/softplus, float dtype.
        A: (d, n) state matrix diagonal, float dtype (real) or complex64/complex128 (complex).
        B: input projection, one of
            - (d, n) time-invariant: a float tensor, or complex when A is complex;
            - (b, n, l) variable, shared by all channels: float dtype;
            - (b, g, n, l) grouped, d % g == 0, channel c uses group c // (d // g): float dtype.
            For complex A the variable/grouped forms are real tensors with real/imag parts
            interleaved along the last axis: (b, n, 2l) / (b, g, n, 2l).
        C: output projection, same forms as B (chosen independently of B).
        D: (d,) skip weight, float dtype; default None (no skip).
        z: (b, d, l) gate, float dtype; default None. If given y is multiplied by silu(z).
        delta_bias: (d,) added to delta before the softplus, float dtype; default None.
        delta_softplus: apply softplus to delta + delta_bias; default False.
        initial_state: (b, d, n) state h_{-1}; float dtype for real A, complex64/complex128 for
            complex A; default None (zeros).
        return_final_state: also return the last state h_{l-1}; default False.
        algorithm: ``"chunked"`` (default; one linear scan over time without autograd inside:
            token by token over time-major blocks below 4096 tokens, a parallel chunked scan
            from there on) or ``"recurrent"`` (a token loop under autograd, the readable
            definition).
        seq_idx: (b, l) int32/int64 ids of packed sequences; the state resets to zero wherever the
            id changes between consecutive tokens (initial_state applies to each row's first
            sequence only); default None.

    Returns:
        y (b, d, l) in u's dtype; with ``return_final_state``, the pair (y, h_last) with
        h_last (b, d, n) in the compute dtype (float32/float64, complex64/complex128 for complex
        A). Both are differentiable in every tensor input (h_last included).

    Example:
        >>> b, d, l, n = 2, 8, 32, 4
        >>> u, delta = torch.randn(b, d, l), torch.rand(b, d, l)
        >>> A = -torch.arange(1, n + 1.0).repeat(d, 1)
        >>> B, C = torch.randn(b, n, l), torch.randn(b, n, l)
        >>> y, h = selective_scan_reference(u, delta, A, B, C, D=torch.ones(d), delta_softplus=True,
        ...                                 return_final_state=True)
        >>> y.shape, h.shape
        (torch.Size([2, 8, 32]), torch.Size([2, 8, 4]))
    """
    validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, seq_idx)
    expect_choice("algorithm", algorithm, ALGORITHMS)
    d = u.shape[1]
    real_dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if any(t is not None and t.dtype == torch.complex128 for t in (A, B, C, initial_state)):
        real_dtype = torch.float64
    state_dtype = _complex_of(real_dtype) if A.is_complex() else real_dtype

    # Why upcast: exp(Delta A) and the running products lose all precision in half types.
    Delta = delta.to(real_dtype)
    if delta_bias is not None:
        Delta = Delta + delta_bias.to(real_dtype)[:, None]
    if delta_softplus:
        Delta = F.softplus(Delta)
    u_c = u.to(real_dtype)
    A_c = A.to(state_dtype)
    B_c = _to_state(B, A.is_complex(), real_dtype, state_dtype)
    C_c = _to_state(C, A.is_complex(), real_dtype, state_dtype)
    h0 = None if initial_state is None else initial_state.to(state_dtype)

    # keep[t] = 0 where a new packed sequence starts: the decay into it is zero.
    keep = None if seq_idx is None else (~segment_resets(seq_idx)).to(real_dtype)
    scan = _chunked if algorithm == "chunked" else _recurrent
    y, h_last = scan(u_c, Delta, A_c, B_c, C_c, h0, d, keep)

    if D is not None:
        y = y + D.to(real_dtype)[:, None] * u_c
    if z is not None:
        y = y * F.silu(z.to(real_dtype))
    y = y.to(u.dtype)
    return (y, h_last) if return_final_state else y


# Tokens whose decays the token loop computes at once (a few small ops per token cost more than
# the arithmetic on a CPU).
_RECURRENT_DECAY_BLOCK = 64


def _recurrent(u, Delta, A, B, C, h0, d, keep=None):
    """One step per token: the definition. Returns (y (b, d, l) real, h_last (b, d, n)).

    Without autograd the state is updated in place by the same ops (a 32-token prompt
    of a 130M-class Mamba-1 on 2 CPU cores: 142 -> 121 ms, from one op and two allocations fewer
    per token and layer)."""
    bsz, _, l = u.shape
    in_place = not grad_needed(u, Delta, A, B, C, h0)
    if h0 is None:
        h = torch.zeros(bsz, d, A.shape[1], dtype=A.dtype, device=u.device)
    else:
        h = h0.clone() if in_place else h0
    drive = Delta * u                                                    # (b, d, l): Delta_t u_t
    ys = []
    for t in range(l):
        if t % _RECURRENT_DECAY_BLOCK == 0:  # the decays of the next block of tokens in one call
            block = Delta[:, :, t:t + _RECURRENT_DECAY_BLOCK, None] * A[:, None, :]     # (b, d, k, n)
            decays = _decay(block)
        decay = decays[:, :, t % _RECURRENT_DECAY_BLOCK]
        if keep is not None:
            decay = decay * keep[:, t, None, None]
        if in_place:
            h.mul_(decay).addcmul_(drive[:, :, t, None], _at(B, t, d))
        else:
            h = torch.addcmul(decay * h, drive[:, :, t, None], _at(B, t, d))  # a_t h + Delta_t u_t B_t
        ys.append(_inner(_at(C, t, d), h, dim=-1))                       # (b, d)
    return torch.stack(ys, dim=-1), h


def _chunked(u, Delta, A, B, C, h0, d, keep=None):
    """The recurrence over all tokens at once as a linear scan along l, block by block of
    channels (no loop over tokens with autograd in it). Returns (y (b, d, l) real, h_last
    (b, d, n))."""
    bsz, _, l = u.shape
    n = A.shape[1]
    per_channel = max(1, _BLOCK_ELEMENTS // (bsz * n * l))
    if l < _PARALLEL_SCAN_LENGTH:
        return _time_major(u, Delta, A, B, C, h0, d, keep, max(per_channel, -(-_MIN_TIME_MAJOR_ROW // (bsz * n))))
    ys, finals = [], []
    for lo, hi in _channel_blocks(d, per_channel, B, C):
        dt = Delta[:, lo:hi, None, :]                                            # (b, k, 1, l)
        decay = _decay(dt * A[lo:hi, :, None])                                   # (b, k, n, l)
        if keep is not None:
            decay = decay * keep[:, None, None, :]
        drive = (dt * u[:, lo:hi, None, :]) * _channel_block(B, d, lo, hi)        # (b, k, n, l)
        h = linear_scan(decay, drive, None if h0 is None else h0[:, lo:hi], dim=-1, method="chunked")
        ys.append(_inner(_channel_block(C, d, lo, hi), h, dim=2))               # (b, k, l)
        finals.append(h[..., -1])                                                # (b, k, n)
    return torch.cat(ys, dim=1), torch.cat(finals, dim=1)


# Below this many tokens the chunked algorithm scans time-major blocks token by token
# (_time_major), each token's row of at least _MIN_TIME_MAJOR_ROW states (a per-token op costs a
# few microseconds of overhead); from it on (b, k, n, l) blocks of _BLOCK_ELEMENTS by the parallel
# chunked scan, whose memory stays bounded at any length. Time-major against parallel on 2
# cores, forward + backward: 48 tokens (b 224, d 64, n 8, a forecasting batch) 111 against
# 235 ms, 512 (b 8, d 256, n 16) 305 against 966 ms, 2048 (b 1, d 256) 0.13 against 0.38 s,
# 4096 a tie; forward alone at b 1, d 1536, n 16: 1024 tokens 0.16 against 0.45 s, 2048 0.51-0.68
# against 0.86-0.93 s, 4096 a tie.
_PARALLEL_SCAN_LENGTH = 4096
_MIN_TIME_MAJOR_ROW = 4096


def _time_major(u, Delta, A, B, C, h0, d, keep, per_channel: int):
    """:func:`_chunked` on (l, b, k, n) blocks of ``per_channel`` channels whose memory is
    time-major, scanned by :func:`linear_scan`'s sequential method: each token then updates one
    contiguous row of b k n states, with no flips, shifts or log-depth passes over the block."""
    Delta_t, u_t = Delta.permute(2, 0, 1).contiguous(), u.permute(2, 0, 1).contiguous()       # (l, b, d)
    B_t, C_t = _time_slowest(B), _time_slowest(C)
    keep_t = None if keep is None else keep.T.contiguous()[:, :, None, None]                # (l, b, 1, 1)
    ys, finals = [], []
    for lo, hi in _channel_blocks(d, per_channel, B, C):
        dt = Delta_t[:, :, lo:hi, None]                                           # (l, b, k, 1)
        decay = _decay(dt * A[lo:hi])                                             # (l, b, k, n)
        if keep_t is not None:
            decay = decay * keep_t
        drive = (dt * u_t[:, :, lo:hi, None]) * _channel_block(B_t, d, lo, hi).permute(3, 0, 1, 2)
        h = linear_scan(decay, drive, None if h0 is None else h0[:, lo:hi], dim=0, method="sequential")
        ys.append(_inner(_channel_block(C_t, d, lo, hi).permute(3, 0, 1, 2), h, dim=-1))   # (l, b, k)
        finals.append(h[-1])                                                      # (b, k, n)
    return torch.cat(ys, dim=2).permute(1, 2, 0).contiguous(), torch.cat(finals, dim=1)


def _time_slowest(X):
    """B or C, same shape and values, with time the slowest axis in memory (a copy), so that the
    (l, b, k, n) views of :func:`_channel_block` permuted time first are dense; a time-invariant
    (d, n) X as it is."""
    return X if X.dim() == 2 else X.movedim(-1, 0).contiguous().movedim(0, -1)


def _decay(log_decay):
    """exp of the (real or complex) log-decay; real ones through :func:`decay_exp` (fast where
    the result underflows). ``log_decay`` must be a temporary of the caller's: without autograd
    the exp is taken in place. Each (b, d, k, n) block is megabytes, and on the 2-core CPU machine
    a fresh allocation of that size page-faults on every call (a 32-token Mamba-1 prompt: 200 ms
    out of place, 118 ms in place)."""
    if log_decay.requires_grad:
        return torch.exp(log_decay) if log_decay.is_complex() else decay_exp(log_decay)
    return log_decay.exp_() if log_decay.is_complex() else decay_exp_(log_decay)


def _inner(C, h, dim):
    """<C, h> summed over the state axis; 2 Re(.) for a complex (conjugate-pair) state."""
    y = (C * h).sum(dim)
    return 2 * y.real if y.is_complex() else y


def _at(X, t, d):
    """B_t or C_t for every channel, broadcastable to (b, d, n)."""
    if X.dim() == 2:  # (d, n): time-invariant
        return X
    if X.dim() == 3:  # (b, n, l): one row shared by all channels
        return X[:, None, :, t]
    return X[..., t].repeat_interleave(d // X.shape[1], dim=1)  # (b, g, n) -> (b, d, n)


def _channel_block(X, d, lo, hi):
    """B or C for channels [lo, hi), broadcastable to (b, hi - lo, n, l), without copying.

    For grouped X the block must lie inside one group (see :func:`_channel_blocks`)."""
    if X.dim() == 2:  # (d, n)
        return X[None, lo:hi, :, None]
    if X.dim() == 3:  # (b, n, l)
        return X[:, None]
    return X[:, lo // (d // X.shape[1]), None]  # (b, g, n, l) -> the block's group, (b, 1, n, l)


def _channel_blocks(d, size, *projections):
    """[lo, hi) ranges of at most ``size`` channels that never straddle a group boundary of a
    grouped B or C, so that each block reads one group's rows as a broadcast view."""
    cuts = set(range(0, d, size))
    for X in projections:
        if X.dim() == 4:
            cuts.update(range(0, d, d // X.shape[1]))
    cuts = sorted(cuts) + [d]
    return list(zip(cuts[:-1], cuts[1:]))


def _to_state(X, complex_a, real_dtype, state_dtype):
    """B or C in the compute dtype; interleaved real (..., 2l) -> complex (..., l) for complex A."""
    if not complex_a or X.dim() == 2:
        return X.to(state_dtype)
    return torch.view_as_complex(X.to(real_dtype).unflatten(-1, (-1, 2)).contiguous())


def _complex_of(real_dtype):
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


def validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, seq_idx):
    """Every input check of :func:`selective_scan`, before any compute."""
    expect_tensor("u", u, ndim=3)
    bsz, d, l = u.shape
    if l == 0:
        raise ValueError(f"u: expected a sequence length l >= 1, got shape (b, d, l) = {tuple(u.shape)}")
    expect_tensor("delta", delta, ndim=3)
    expect_shape("delta", delta, (bsz, d, l), "(b, d, l)")
    expect_tensor("A", A, ndim=2, dtypes=FLOAT_DTYPES + COMPLEX_DTYPES)
    if A.shape[0] != d:
        raise ValueError(f"A: expected shape (d, n) with d = {d} (the channels of u), got {tuple(A.shape)}")
    n = A.shape[1]
    complex_a = A.is_complex()
    for name, X in (("B", B), ("C", C)):
        _validate_projection(name, X, bsz, d, n, l, complex_a)
    if D is not None:
        expect_tensor("D", D, ndim=1)
        expect_shape("D", D, (d,), "(d,)")
    if z is not None:
        expect_tensor("z", z, ndim=3)
        expect_shape("z", z, (bsz, d, l), "(b, d, l)")
    if delta_bias is not None:
        expect_tensor("delta_bias", delta_bias, ndim=1)
        expect_shape("delta_bias", delta_bias, (d,), "(d,)")
    if not isinstance(delta_softplus, bool):
        raise TypeError(f"delta_softplus: expected a bool, got {type(delta_softplus).__name__}")
    if not isinstance(return_final_state, bool):
        raise TypeError(f"return_final_state: expected a bool, got {type(return_final_state).__name__}")
    if initial_state is not None:
        expect_tensor("initial_state", initial_state, ndim=3, dtypes=FLOAT_DTYPES + COMPLEX_DTYPES)
        expect_shape("initial_state", initial_state, (bsz, d, n), "(b, d, n)")
        if initial_state.is_complex() != complex_a:
            kind = "complex" if complex_a else "real"
            raise ValueError(
                f"initial_state: expected a {kind} tensor like A ({A.dtype}), got {initial_state.dtype}"
            )
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, ndim=2, dtypes=INDEX_DTYPES)
        expect_shape("seq_idx", seq_idx, (bsz, l), "(b, l)")
    expect_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state,
                       seq_idx=seq_idx)


def _validate_projection(name, X, bsz, d, n, l, complex_a):
    """B or C: (d, n) time-invariant, (b, n, L) variable or (b, g, n, L) grouped, L = 2l for an
    interleaved complex projection and l otherwise."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(X).__name__}")
    if X.dim() == 2:
        if complex_a and not X.is_complex():
            raise TypeError(
                f"{name}: expected a complex (d, n) tensor (complex64/complex128) with complex A, got {X.dtype}"
            )
        expect_tensor(name, X, dtypes=COMPLEX_DTYPES if complex_a else FLOAT_DTYPES)
        expect_shape(name, X, (d, n), "(d, n) time-invariant")
        return
    if X.dim() not in (3, 4):
        raise ValueError(
            f"{name}: expected 2 dims (d, n), 3 dims (b, n, l) or 4 dims (b, g, n, l), got shape {tuple(X.shape)}"
        )
    if X.is_complex():
        raise TypeError(
            f"{name}: expected a real float tensor for variable/grouped {name} (with complex A, real and "
            f"imaginary parts interleaved along the length axis), got {X.dtype}"
        )
    expect_tensor(name, X, dtypes=FLOAT_DTYPES)
    L, length = (2 * l, "2l (real/imag interleaved, complex A)") if complex_a else (l, "l")
    if X.dim() == 3:
        expect_shape(name, X, (bsz, n, L), f"(b, n, {length})")
        return
    g = X.shape[1]
    if g == 0 or d % g != 0:
        raise ValueError(f"{name}: expected a group count g dividing d = {d}, got g = {g} (shape {tuple(X.shape)})")
    expect_shape(name, X, (bsz, g, n, L), f"(b, g, n, {length})")
