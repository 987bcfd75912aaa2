"""Mamba-2 state space duality (SSD), MATH.md section 3: the reference and the CPU path.

Per batch and head the state is a (p x n) matrix:

    dt_t = clamp(softplus(dt_t + dt_bias), lo, hi)        (each step optional, see :func:`ssd`)
    h_t  = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T
    y_t  = h_t C_t + D x_t;     y_t *= silu(z_t)

Three algorithms give the same y and final state:

- ``"recurrent"``: the token loop above, the definition (O(l) Python steps);
- ``"quadratic"``: the attention-like form Y = (L o C B^T)(dt X) over the whole sequence, with the
  1-semiseparable mask L[i, j] = exp(sum_{k=j+1..i} dt_k A); O(l^2) memory, written here on its own
  so that it checks the chunked path independently;
- ``"chunked"`` (default): the quadratic form inside chunks plus states passed between chunks,
  through the machinery shared with Mamba-3 (:func:`mambakit.ops.common.chunked_state_space`).

Layout follows the official ``mamba_chunk_scan_combined``: x (b, l, h, p), dt (b, l, h), A (h,),
B and C (b, l, g, n), states (b, h, p, n).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._checks import (
    INDEX_DTYPES,
    compute_dtype,
    expect_choice,
    expect_positive_int,
    expect_same_device,
    expect_shape,
    expect_tensor,
)
from ..common import canonical_segments, chunked_state_space, decay_exp, segment_resets

ALGORITHMS = ("chunked", "quadratic", "recurrent")
_DEFAULT_DT_LIMIT = (0.0, float("inf"))


# ----------------------------------------------------------------------------------------------
# Input preparation
# ----------------------------------------------------------------------------------------------


def _discretize_dt(dt, dt_bias, dt_softplus, dt_limit):
    """dt + dt_bias, softplus, clamp, in that order (as the official kernels)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        # threshold 20 (the default) is also the official kernels' switch to the identity.
        dt = F.softplus(dt)
    # Like the official Python paths, clamp only for a non-default limit: the default (0, inf)
    # leaves dt untouched (negative dt without softplus passes through).
    if tuple(dt_limit) != _DEFAULT_DT_LIMIT:
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _heads_from_groups(t, h):
    """(b, l, g, n) -> (b, l, h, n): head j reads group j // (h // g)."""
    g = t.shape[2]
    return t if g == h else t.repeat_interleave(h // g, dim=2)


# ----------------------------------------------------------------------------------------------
# The three algorithms. Inputs: x (b, l, h, p), dt (b, l, h) already discretized, A (h,),
# B, C (b, l, g, n), initial_state (b, h, p, n) or None, segment (b, l) canonical ids or None,
# all in one compute dtype. Each returns (y_ssm (b, l, h, p), final state (b, h, p, n)), without
# the D skip and the z gate.
# ----------------------------------------------------------------------------------------------


def ssd_recurrent(x, dt, A, B, C, initial_state=None, segment=None):
    """The definition: one state update per token."""
    b, l, h, p = x.shape
    n = B.shape[-1]
    B, C = _heads_from_groups(B, h), _heads_from_groups(C, h)
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state
    resets = None if segment is None else segment_resets(segment)
    ys = []
    for t in range(l):
        decay = decay_exp(dt[:, t] * A)  # (b, h)
        if resets is not None:
            # A new packed sequence starts here: nothing of the previous one flows in.
            decay = decay.masked_fill(resets[:, t, None], 0.0)
        # (b, h, p, 1) * (b, h, 1, n) -> (b, h, p, n)
        write = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        state = decay[..., None, None] * state + write
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1), state


def _segsum(a):
    """a (..., l) -> (..., l, l) with [i, j] = sum_{k=j+1..i} a_k for j <= i, -inf above.

    A masked cumulative sum rather than cumsum differences, so no long-range cancellation and
    exp() is only ever taken of sums of non-positive numbers (or -inf, which gives exact zeros).
    """
    l = a.shape[-1]
    rows = a[..., :, None].expand(*a.shape, l)  # [i, j] = a_i
    below = torch.ones(l, l, dtype=torch.bool, device=a.device).tril(-1)
    sums = rows.masked_fill(~below, 0.0).cumsum(dim=-2)
    on_or_below = torch.ones(l, l, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~on_or_below, float("-inf"))


def ssd_quadratic(x, dt, A, B, C, initial_state=None, segment=None):
    """The whole-sequence 1-semiseparable (attention-like) form, O(l^2) memory."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    k = h // g  # heads per group; head j = (group j // k, member j % k)
    log_decay = (dt * A).permute(0, 2, 1)  # (b, h, l)
    L = decay_exp(_segsum(log_decay))  # (b, h, l_i, l_j)
    from_start = decay_exp(torch.cumsum(log_decay, dim=-1))  # (b, h, l): decay of S0 up to token i
    if segment is not None:
        same = segment[:, :, None] == segment[:, None, :]  # (b, l_i, l_j)
        L = L * same[:, None]
        from_start = from_start * (segment == segment[:, :1])[:, None]

    # (b, l, g, n) x (b, l, g, n) -> (b, g, l_i, l_j): one C B^T per group, shared by its heads.
    CB = torch.einsum("bign,bjgn->bgij", C, B)
    mix = L.view(b, g, k, l, l) * dt.permute(0, 2, 1).reshape(b, g, k, 1, l)  # L[i, j] dt_j
    xg = x.view(b, l, g, k, p)
    # [b, g, k, l_i, l_j] @ [b, l_j, g, k, p] -> [b, l_i, g, k, p]
    y = torch.einsum("bgkij,bgij,bjgkp->bigkp", mix, CB, xg)

    S0 = None if initial_state is None else initial_state.view(b, g, k, p, n)
    if S0 is not None:
        # exp(cumsum) (C_i . S0): [b, g, k, p, n] . [b, l, g, n] -> [b, l, g, k, p]
        y = y + torch.einsum("bgkpn,bign,bgki->bigkp", S0, C, from_start.view(b, g, k, l))

    # Final state: the last row of the mask weights every token's write.
    to_end = (L[..., -1, :] * dt.permute(0, 2, 1)).view(b, g, k, l)  # (b, g, k, l_j)
    final = torch.einsum("bgkj,bjgkp,bjgn->bgkpn", to_end, xg, B)
    if S0 is not None:
        final = final + from_start[..., -1].view(b, g, k, 1, 1) * S0
    return y.reshape(b, l, h, p), final.reshape(b, h, p, n)


def ssd_chunked(x, dt, A, B, C, initial_state=None, segment=None, chunk_size=256):
    """The chunked algorithm through the shared core (SSD is its rank-1 case)."""
    h = x.shape[2]
    q = _heads_from_groups(C, h).unsqueeze(3)  # (b, l, h, 1, n)
    k = _heads_from_groups(B, h).unsqueeze(3)  # (b, l, h, 1, n)
    v = x.unsqueeze(3)  # (b, l, h, 1, p)
    y, final = chunked_state_space(
        q, k, v, dt * A, dt, initial_state=initial_state, segment=segment, chunk_size=chunk_size
    )
    return y.squeeze(3), final


# ----------------------------------------------------------------------------------------------
# Validation and the public function
# ----------------------------------------------------------------------------------------------


def _expect_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _expect_dt_limit(dt_limit):
    ok = isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)
    if not ok:
        raise ValueError(f"dt_limit: expected a (lo, hi) pair of numbers, got {dt_limit!r}")
    lo, hi = dt_limit
    if not lo <= hi:  # also rejects NaN
        raise ValueError(f"dt_limit: expected lo <= hi, got {dt_limit!r}")


def validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
              seq_idx, return_final_states, algorithm):
    expect_tensor("x", x, ndim=4)
    b, l, h, p = x.shape
    if l == 0:
        raise ValueError("x: expected a sequence length l >= 1, got 0 (shape (b, l, h, p))")
    act = (x.dtype,)  # activations share x's dtype; parameters and states may differ
    expect_tensor("dt", dt, ndim=3, dtypes=act)
    expect_tensor("A", A, ndim=1)
    expect_tensor("B", B, ndim=4, dtypes=act)
    expect_tensor("C", C, ndim=4, dtypes=act)
    if D is not None:
        expect_tensor("D", D)
    if z is not None:
        expect_tensor("z", z, ndim=4, dtypes=act)
    if dt_bias is not None:
        expect_tensor("dt_bias", dt_bias, ndim=1)
    if initial_states is not None:
        expect_tensor("initial_states", initial_states, ndim=4)
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, ndim=2, dtypes=INDEX_DTYPES)
    _expect_bool("dt_softplus", dt_softplus)
    _expect_bool("return_final_states", return_final_states)
    expect_positive_int("chunk_size", chunk_size)
    expect_choice("algorithm", algorithm, ALGORITHMS)
    _expect_dt_limit(dt_limit)

    expect_shape("dt", dt, (b, l, h), "(b, l, h)")
    expect_shape("A", A, (h,), "(h,)")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g:
        raise ValueError(f"B: expected a group count g dividing the heads h = {h}, got g = {g}")
    expect_shape("B", B, (b, l, g, n), "(b, l, g, n)")
    expect_shape("C", C, (b, l, g, n), "(b, l, g, n)")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D: expected shape (h,) = {(h,)} or (h, p) = {(h, p)}, got {tuple(D.shape)}")
    if z is not None:
        expect_shape("z", z, (b, l, h, p), "(b, l, h, p)")
    if dt_bias is not None:
        expect_shape("dt_bias", dt_bias, (h,), "(h,)")
    if initial_states is not None:
        expect_shape("initial_states", initial_states, (b, h, p, n), "(b, h, p, n)")
    if seq_idx is not None:
        expect_shape("seq_idx", seq_idx, (b, l), "(b, l)")
    expect_same_device(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                       initial_states=initial_states, seq_idx=seq_idx)


_RUN = {"chunked": ssd_chunked, "quadratic": ssd_quadratic, "recurrent": ssd_recurrent}


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_states: bool = False,
    algorithm: str = "chunked",
):
    """Mamba-2 SSD scan (MATH.md section 3), conventions of ``mamba_chunk_scan_combined``.

    Per batch, head and token: ``dt <- dt + dt_bias``; ``dt <- softplus(dt)`` if ``dt_softplus``;
    ``dt <- clamp(dt, *dt_limit)`` if ``dt_limit != (0, inf)``; then
    ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` (a (p, n) state), ``y_t = h_t C_t + D x_t``,
    and ``y_t *= silu(z_t)``. The state math runs in float32 (float64 if any input is float64).

    Args:
        x: (b, l, h, p) inputs, float16/bfloat16/float32/float64; l >= 1, any length.
        dt: (b, l, h) raw time steps, x's dtype.
        A: (h,) per-head decay rate, any float dtype; meant to be negative (not checked, it would
            need a device sync).
        B: (b, l, g, n) input projections, x's dtype; g divides h and head j uses group
            j // (h // g).
        C: (b, l, g, n) output projections, x's dtype.
        chunk_size: positive int, default 256. Chunk length Q of the chunked algorithm (l need
            not be a multiple of it); ignored by the other algorithms.
        D: (h,) or (h, p) skip weight, any float dtype, default None (no skip).
        z: (b, l, h, p) gate, x's dtype, default None; the output is multiplied by silu(z)
            after the D skip.
        dt_bias: (h,) added to dt, any float dtype, default None.
        dt_softplus: bool, default False; apply softplus to dt + dt_bias.
        dt_limit: (lo, hi) numbers with lo <= hi, default (0.0, inf); dt is clamped to it only
            when it differs from the default (as the official reference paths).
        initial_states: (b, h, p, n) state before token 0, any float dtype, default None (zeros).
        seq_idx: (b, l) int32/int64 ids of packed sequences, default None. The state resets to
            zero wherever the id changes between consecutive tokens; initial_states applies to
            the first sequence of each row only.
        return_final_states: bool, default False; also return the state after token l - 1.
        algorithm: "chunked" (default), "quadratic" (O(l^2) memory) or "recurrent" (token loop).
            All three give the same result up to rounding.

    Returns:
        y (b, l, h, p) in x's dtype; with ``return_final_states`` the pair
        (y, final_states (b, h, p, n) in the compute dtype, float32 or float64).

    Example:
        >>> b, l, h, p, g, n = 2, 100, 4, 16, 1, 32
        >>> x, z = torch.randn(b, l, h, p), torch.randn(b, l, h, p)
        >>> dt, B, C = torch.randn(b, l, h), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
        >>> A, D, dt_bias = -torch.rand(h) - 0.5, torch.ones(h), torch.zeros(h)
        >>> y, last = ssd_reference(x, dt, A, B, C, chunk_size=32, D=D, z=z, dt_bias=dt_bias,
        ...                         dt_softplus=True, return_final_states=True)
        >>> y.shape, last.shape
        (torch.Size([2, 100, 4, 16]), torch.Size([2, 4, 16, 32]))

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices, sizes or option values.
    """
    validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
              seq_idx, return_final_states, algorithm)
    cdtype = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)

    def up(t):
        return None if t is None else t.to(cdtype)

    xc = up(x)
    dtc = _discretize_dt(up(dt), up(dt_bias), dt_softplus, dt_limit)
    segment = None if seq_idx is None else canonical_segments(seq_idx)
    run = _RUN[algorithm]
    extra = {"chunk_size": chunk_size} if algorithm == "chunked" else {}
    y, final = run(xc, dtc, up(A), up(B), up(C), up(initial_states), segment, **extra)
    if D is not None:
        Dc = up(D)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(up(z))
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y
