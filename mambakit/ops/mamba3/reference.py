"""Mamba-3 reference (MATH.md section 4): exponential-trapezoidal recurrence, data-dependent rotary
phase (a complex diagonal state transition) and MIMO, in plain PyTorch.

Layout: b batch, l length, h heads, p head dim, n state size, g groups of B/C, r MIMO rank.

Two algorithms compute the same function:

* ``recurrent``: the definition, one token at a time.
* ``chunked``: the trapezoid unrolls to a Mamba-2-style recurrence on the shifted state
  G_t = H_t + c_{t+1} u_t, with u_t = sum_k v_{t,k} K_{t,k}^T and c_t = (1 - lambda_t) Delta_t:

      G_t = alpha_t G_{t-1} + (gamma_t + c_{t+1}) u_t,     H_t = G_t - c_{t+1} u_t,

  because alpha_{t+1} G_t = alpha_{t+1} H_t + beta_{t+1} u_t. So the shared chunked state-space
  core runs with key weight gamma_t + c_{t+1} (c_l = 0, which makes the final G equal H) and
  diagonal weight gamma_t, starting from G_{-1} = H_{-1} + c_0 u_{-1} (the carried K_prev, x_prev).
"""

from __future__ import annotations

import math
from typing import NamedTuple

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

ROPE_LAYOUTS = ("interleaved", "halves")
ALGORITHMS = ("chunked", "recurrent")


class Mamba3State(NamedTuple):
    """Recurrent state of one Mamba-3 layer between calls (what decoding carries).

    phi: (b, h, n_angles) accumulated rotary phase, in [0, 2 pi).
    H: (b, h, p, n) the SSM state, float32 or float64.
    K_prev: (b, r, h, n) the previous token's rotated key.
    x_prev: (b, h, p) the previous token's input.
    """

    phi: torch.Tensor
    H: torch.Tensor
    K_prev: torch.Tensor
    x_prev: torch.Tensor


def rope_layout_for(rope_layout: str | None, r: int) -> str:
    """The rotary layout to use: the one given, else "interleaved" for SISO (r = 1) and "halves"
    for MIMO, the official defaults."""
    return rope_layout or ("interleaved" if r == 1 else "halves")


def rotate(v: torch.Tensor, phi: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate pairs of state entries of v (..., n) by the angles phi (..., n_angles).

    ``interleaved``: angle j turns the pair (2j, 2j + 1); ``halves``: the pair (j, j + n/2).
    Entries in no pair pass unchanged. phi broadcasts against v's leading axes.
    """
    n, n_angles = v.shape[-1], phi.shape[-1]
    if n_angles == 0:
        return v
    if layout == "interleaved":
        first, second = v[..., 0 : 2 * n_angles : 2], v[..., 1 : 2 * n_angles : 2]
    else:
        first, second = v[..., :n_angles], v[..., n // 2 : n // 2 + n_angles]
    cos, sin = torch.cos(phi), torch.sin(phi)
    new_first = cos * first - sin * second
    new_second = sin * first + cos * second
    if layout == "interleaved":
        rotated = torch.stack([new_first, new_second], dim=-1).flatten(-2)
        return torch.cat([rotated, v[..., 2 * n_angles :]], dim=-1)
    return torch.cat(
        [new_first, v[..., n_angles : n // 2], new_second, v[..., n // 2 + n_angles :]], dim=-1
    )


def rotary_phase(angles: torch.Tensor, dt: torch.Tensor, phi0: torch.Tensor,
                 segment: torch.Tensor | None = None) -> torch.Tensor:
    """phi_t = phi0 + sum_{s <= t} pi tanh(angles_s) dt_s, reduced mod 2 pi: angles (b, l, h, a),
    dt (b, l, h), phi0 (b, h, a) -> (b, l, h, a) in angles' dtype. Accumulated in float64, so
    long sequences keep their angle to float64 precision before the reduction (all that matters
    of it for the cos/sin). ``segment``: (b, l) canonical sequence ids (0, 0, 1, ...): each later
    sequence starts again from phase 0, the sum over its own tokens only."""
    increments = (math.pi * torch.tanh(angles) * dt[..., None]).double()
    total = torch.cumsum(increments, dim=1)
    if segment is None:
        total = total + phi0.double()[:, None]
    else:
        # Subtract what the earlier sequences summed: the exclusive sum at this sequence's start.
        b, l = segment.shape
        position = torch.arange(l, device=segment.device).expand(b, l)
        starts = segment_resets(segment)
        starts[:, 0] = True
        start = torch.cummax(torch.where(starts, position, 0), dim=1).values  # (b, l) index of the start
        before = (total - increments).gather(1, start[:, :, None, None].expand_as(total))
        first = (segment == 0)[:, :, None, None]
        total = total - before + torch.where(first, phi0.double()[:, None], 0.0)
    return torch.remainder(total, 2 * math.pi).to(angles.dtype)


def trapezoid_weights(dt: torch.Tensor, A: torch.Tensor, trap: torch.Tensor):
    """(b, l, h) each -> (log_decay = dt A, gamma = lambda dt, c = (1 - lambda) dt) with
    lambda = sigmoid(trap); the trapezoid's previous-token weight is beta_t = c_t exp(dt_t A_t)."""
    lam = torch.sigmoid(trap)
    return dt * A, lam * dt, (1 - lam) * dt


def group_to_heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """(b, l, r, g, n) -> (b, l, h, r, n): head j reads group j // (h // g)."""
    g = t.shape[3]
    return t.repeat_interleave(h // g, dim=3).permute(0, 1, 3, 2, 4)


def validate(x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, initial_state, chunk_size,
             algorithm, rope_layout, seq_idx=None):
    expect_tensor("x", x, ndim=4)
    b, l, h, p = x.shape
    expect_tensor("B", B, ndim=5)
    r, g, n = B.shape[2], B.shape[3], B.shape[4]
    expect_shape("B", B, (b, l, r, g, n), "(b, l, r, g, n)")
    expect_tensor("C", C, ndim=5)
    expect_shape("C", C, (b, l, r, g, n), "(b, l, r, g, n)")
    if h % g:
        raise ValueError(f"B: the number of groups g = {g} must divide the number of heads h = {h}")
    for name, t in (("dt", dt), ("A", A), ("trap", trap)):
        expect_tensor(name, t, ndim=3)
        expect_shape(name, t, (b, l, h), "(b, l, h)")
    expect_tensor("angles", angles, ndim=4)
    n_angles = angles.shape[3]
    expect_shape("angles", angles, (b, l, h, n_angles), "(b, l, h, n_angles)")
    if n_angles > n // 2:
        raise ValueError(f"angles: expected at most n // 2 = {n // 2} angles per head, got {n_angles}")
    if z is not None:
        expect_tensor("z", z, ndim=4)
        expect_shape("z", z, (b, l, h, p), "(b, l, h, p)")
    validate_parameters(h, r, p, n, D, z is not None, B_bias, C_bias, mimo_x, mimo_z, mimo_o)
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) != 4:
            raise TypeError("initial_state: expected a tuple (phi, H, K_prev, x_prev)")
        validate_state("initial_state", initial_state, b, h, p, n, r, n_angles)
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, ndim=2, dtypes=INDEX_DTYPES)
        expect_shape("seq_idx", seq_idx, (b, l), "(b, l)")
    expect_positive_int("chunk_size", chunk_size)
    expect_choice("algorithm", algorithm, ALGORITHMS)
    if rope_layout is not None:
        expect_choice("rope_layout", rope_layout, ROPE_LAYOUTS)
    state_tensors = dict(zip(("phi", "H", "K_prev", "x_prev"), initial_state or (None,) * 4))
    expect_same_device(
        x=x, dt=dt, A=A, B=B, C=C, trap=trap, angles=angles, D=D, z=z, B_bias=B_bias, C_bias=C_bias,
        mimo_x=mimo_x, mimo_z=mimo_z, mimo_o=mimo_o, seq_idx=seq_idx,
        **{f"initial_state.{k}": v for k, v in state_tensors.items()},
    )
    if l == 0:
        raise ValueError("x: expected a sequence length l >= 1, got 0")


STATE_DTYPES = (torch.float32, torch.float64)


def validate_state(name: str, state: tuple, b, h, p, n, r, n_angles, phi_dtypes=None) -> None:
    """Shapes (and H's dtype) of a (phi, H, K_prev, x_prev) state tuple; ``phi_dtypes`` restricts
    phi's dtype too (the decode step writes it in place)."""
    phi, H, K_prev, x_prev = state
    expect_tensor(f"{name}.phi", phi, ndim=3, **({} if phi_dtypes is None else {"dtypes": phi_dtypes}))
    expect_shape(f"{name}.phi", phi, (b, h, n_angles), "(b, h, n_angles)")
    expect_tensor(f"{name}.H", H, ndim=4, dtypes=STATE_DTYPES)
    expect_shape(f"{name}.H", H, (b, h, p, n), "(b, h, p, n)")
    expect_tensor(f"{name}.K_prev", K_prev, ndim=4)
    expect_shape(f"{name}.K_prev", K_prev, (b, r, h, n), "(b, r, h, n)")
    expect_tensor(f"{name}.x_prev", x_prev, ndim=3)
    expect_shape(f"{name}.x_prev", x_prev, (b, h, p), "(b, h, p)")


def validate_parameters(h, r, p, n, D, has_z, B_bias, C_bias, mimo_x, mimo_z, mimo_o) -> None:
    """Checks of the per-head parameters (D, biases, MIMO weights) shared by the op and its decode
    step (both take mimo_o None for r > 1 as "return the ranks unmixed")."""
    if D is not None:
        expect_tensor("D", D, ndim=1)
        expect_shape("D", D, (h,), "(h,)")
    for name, t in (("B_bias", B_bias), ("C_bias", C_bias)):
        if t is not None:
            expect_tensor(name, t, ndim=3)
            expect_shape(name, t, (h, r, n), "(h, r, n)")
    mimo = {"mimo_x": mimo_x, "mimo_z": mimo_z, "mimo_o": mimo_o}
    if r == 1:
        for name, t in mimo.items():
            if t is not None:
                raise ValueError(f"{name}: only used with MIMO rank r > 1, but B has r = 1")
        return
    required = ["mimo_x"] + (["mimo_z"] if has_z else [])
    for name in required:
        if mimo[name] is None:
            raise ValueError(f"{name}: required (shape (h, r, p) = {(h, r, p)}) when r = {r} > 1")
    if mimo_z is not None and not has_z:
        raise ValueError("mimo_z: given without z; it scales the gate z, so pass z too")
    for name, t in mimo.items():
        if t is not None:
            expect_tensor(name, t, ndim=3)
            expect_shape(name, t, (h, r, p), "(h, r, p)")


def mamba3_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    trap: torch.Tensor,
    angles: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    B_bias: torch.Tensor | None = None,
    C_bias: torch.Tensor | None = None,
    mimo_x: torch.Tensor | None = None,
    mimo_z: torch.Tensor | None = None,
    mimo_o: torch.Tensor | None = None,
    initial_state: Mamba3State | tuple | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    algorithm: str = "chunked",
    rope_layout: str | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Mamba-3 sequence mixing: exponential-trapezoidal SSM with rotary (complex) state, SISO or MIMO
    (the PyTorch reference; inputs already checked by :func:`validate`).

    Per token t and head (MATH.md section 4)::

        lambda = sigmoid(trap); alpha = exp(dt A); beta = (1 - lambda) dt alpha; gamma = lambda dt
        phi_t = phi_{t-1} + pi tanh(angles_t) dt_t
        K_t = Rot(phi_t)(B_t + B_bias); Q_t = Rot(phi_t)(C_t + C_bias)
        H_t = alpha H_{t-1} + beta sum_k v_{t-1,k} K_{t-1,k}^T + gamma sum_k v_{t,k} K_{t,k}^T
        y_{t,k} = H_t Q_{t,k} + D v_{t,k}

    with v_{t,k} = x_t (SISO, r = 1) or x_t * mimo_x[:, k] (MIMO); SISO output y * silu(z), MIMO
    output sum_k y_k * silu(z * mimo_z[:, k]) * mimo_o[:, k] (without z: sum_k y_k * mimo_o[:, k]);
    MIMO without mimo_o returns the gated ranks unmixed, for layers that norm each before mixing.

    Args:
        x: (b, l, h, p) inputs, float16/bfloat16/float32/float64.
        dt: (b, l, h) step sizes Delta > 0 (already softplus-ed and biased).
        A: (b, l, h) data-dependent decay rates, < 0.
        B, C: (b, l, r, g, n) keys and queries, already RMS-normalised; g divides h, head j uses
            group j // (h // g). r = 1 is SISO, r > 1 MIMO.
        trap: (b, l, h) trapezoid logits (lambda = sigmoid(trap)).
        angles: (b, l, h, n_angles) raw rotary angles, n_angles <= n // 2 (0 disables rotation).
        D: (h,) skip weight, optional.
        z: (b, l, h, p) gate, optional.
        B_bias, C_bias: (h, r, n) added to B and C before the rotation, optional.
        mimo_x: (h, r, p), required when r > 1; mimo_z: (h, r, p), required with z when r > 1.
        mimo_o: (h, r, p), the rank mixing when r > 1, or None for the ranks' outputs unmixed.
        initial_state: a :class:`Mamba3State` (phi, H, K_prev, x_prev), or None for zeros.
        return_final_state: also return the state after the last token.
        chunk_size: chunk length of the chunked algorithm; l need not be a multiple of it.
        algorithm: ``"chunked"`` (default; no Python loop over time) or ``"recurrent"``.
        rope_layout: ``"interleaved"`` (pairs (2j, 2j+1), default for r = 1) or ``"halves"``
            (pairs (j, j + n/2), default for r > 1); a checkpoint must run with its own layout.
        seq_idx: (b, l) int32/int64 ids of sequences packed in one row, or None. Where the id
            changes, a new sequence starts: zero state, phase 0 and no previous-token term
            (K_prev, x_prev); initial_state applies to the first sequence of each row only.

    Returns:
        y (b, l, h, p) in x's dtype ((b, l, h, r, p) for r > 1 without mimo_o), or (y, Mamba3State)
        with state tensors in the compute dtype (float32, or float64 if any input is float64).

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices, sizes, a missing MIMO parameter or an unknown option.

    Example:
        >>> b, l, h, p, n = 1, 10, 2, 4, 8
        >>> y = mamba3_reference(torch.randn(b, l, h, p), torch.rand(b, l, h), -torch.rand(b, l, h),
        ...            torch.randn(b, l, 1, 1, n), torch.randn(b, l, 1, 1, n),
        ...            torch.randn(b, l, h), torch.randn(b, l, h, n // 4))
        >>> y.shape
        torch.Size([1, 10, 2, 4])
    """
    b, l, h, p = x.shape
    r, n, n_angles = B.shape[2], B.shape[4], angles.shape[3]
    layout = rope_layout_for(rope_layout, r)
    dtype = compute_dtype(x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, *(initial_state or ()))

    def f(t):
        return None if t is None else t.to(dtype)

    xf, dtf, Af, trapf = f(x), f(dt), f(A), f(trap)
    if initial_state is None:
        phi0 = x.new_zeros(b, h, n_angles, dtype=dtype)
        H0 = x.new_zeros(b, h, p, n, dtype=dtype)
        K0 = x.new_zeros(b, r, h, n, dtype=dtype)
        x0 = x.new_zeros(b, h, p, dtype=dtype)
    else:
        phi0, H0, K0, x0 = (t.to(dtype) for t in initial_state)

    segment = None if seq_idx is None else canonical_segments(seq_idx)
    phi = rotary_phase(f(angles), dtf, phi0, segment)

    Bh, Ch = group_to_heads(f(B), h), group_to_heads(f(C), h)  # (b, l, h, r, n)
    if B_bias is not None:
        Bh = Bh + f(B_bias)
    if C_bias is not None:
        Ch = Ch + f(C_bias)
    K = rotate(Bh, phi[:, :, :, None, :], layout)
    Qr = rotate(Ch, phi[:, :, :, None, :], layout)
    if r == 1:
        v = xf[:, :, :, None, :]  # (b, l, h, 1, p)
        v0 = x0[:, :, None, :]
    else:
        v = xf[:, :, :, None, :] * f(mimo_x)  # (b, l, h, r, p)
        v0 = x0[:, :, None, :] * f(mimo_x)
    K0_heads = K0.permute(0, 2, 1, 3)  # (b, h, r, n)

    log_decay, gamma, c = trapezoid_weights(dtf, Af, trapf)

    if algorithm == "recurrent":
        alpha = decay_exp(log_decay)
        if segment is not None:  # no decay through a boundary, so no previous-token term either (beta = c alpha)
            alpha = alpha.masked_fill(segment_resets(segment)[:, :, None], 0.0)
        H, u_prev, ys = H0, torch.einsum("bhrp,bhrn->bhpn", v0, K0_heads), []
        for t in range(l):
            u_t = torch.einsum("bhrp,bhrn->bhpn", v[:, t], K[:, t])
            H = (
                alpha[:, t, :, None, None] * H
                + (c[:, t] * alpha[:, t])[:, :, None, None] * u_prev
                + gamma[:, t, :, None, None] * u_t
            )
            ys.append(torch.einsum("bhpn,bhrn->bhrp", H, Qr[:, t]))
            u_prev = u_t
        y_ranks = torch.stack(ys, dim=1)
        H_final = H
    else:
        key_weight = gamma + torch.cat([c[:, 1:], torch.zeros_like(c[:, :1])], dim=1)
        G0 = H0 + c[:, 0, :, None, None] * torch.einsum("bhrp,bhrn->bhpn", v0, K0_heads)
        y_ranks, H_final = chunked_state_space(
            Qr, K, v, log_decay, key_weight, diag_weight=gamma, initial_state=G0, segment=segment,
            chunk_size=chunk_size,
        )

    if D is not None:
        y_ranks = y_ranks + f(D)[:, None, None] * v  # (b, l, h, r, p)
    if r == 1:
        y = y_ranks[:, :, :, 0]
        if z is not None:
            y = y * F.silu(f(z))
    else:
        if z is not None:
            y_ranks = y_ranks * F.silu(f(z)[:, :, :, None, :] * f(mimo_z))
        y = y_ranks if mimo_o is None else (y_ranks * f(mimo_o)).sum(dim=3)
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    final = Mamba3State(
        phi=phi[:, -1],
        H=H_final,
        K_prev=K[:, -1].permute(0, 2, 1, 3),
        x_prev=xf[:, -1],
    )
    return y, final
