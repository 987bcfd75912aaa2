"""One Mamba-3 decode token (MATH.md section 4 at l = 1), updating the layer's state in place.

Per batch row and head, with v_k = x * mimo_x[:, k] (v = x when r = 1) and the state
(phi, H, K_prev, x_prev)::

    phi = (phi + pi tanh(angles) dt) mod 2 pi
    K_k = Rot(phi)(B_k + B_bias_k);   Q_k = Rot(phi)(C_k + C_bias_k)
    H = alpha H + beta sum_k v_prev_k K_prev_k^T + gamma sum_k v_k K_k^T
    y_k = H Q_k + D v_k

with alpha = exp(dt A), gamma = lambda dt, beta = (1 - lambda) dt alpha, lambda = sigmoid(trap),
v_prev_k = x_prev * mimo_x[:, k]; then K_prev = K and x_prev = x. The output is y_0 * silu(z)
(SISO) or sum_k y_k silu(z mimo_z_k) mimo_o_k (MIMO); MIMO without ``mimo_o`` returns the ranks
unmixed, (b, h, r, p), for layers that norm each rank before mixing.

:func:`mamba3_step_reference` is the definition and the CPU path; :func:`mamba3_step` dispatches
to the Triton kernel (``step_triton.py``) for CUDA tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._backend import resolve_backend, step_kernel_unsupported
from .._checks import compute_dtype, expect_choice, expect_same_device, expect_shape, expect_tensor, grad_needed
from .reference import ROPE_LAYOUTS, STATE_DTYPES, rope_layout_for, rotate, validate_parameters, validate_state


def validate_step(x, dt, A, B, C, trap, angles, state, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o,
                  rope_layout) -> None:
    """Every input check of :func:`mamba3_step`, before any compute."""
    expect_tensor("x", x, ndim=3)
    b, h, p = x.shape
    for name, t in (("dt", dt), ("A", A), ("trap", trap)):
        expect_tensor(name, t, ndim=2)
        expect_shape(name, t, (b, h), "(b, h)")
    expect_tensor("B", B, ndim=4)
    r, g, n = B.shape[1:]
    expect_tensor("C", C, ndim=4)
    expect_shape("C", C, (b, r, g, n), "(b, r, g, n)")
    if g == 0 or h % g:
        raise ValueError(f"B: expected a group count g dividing the heads h = {h}, got g = {g}")
    expect_tensor("angles", angles, ndim=3)
    n_angles = angles.shape[2]
    expect_shape("angles", angles, (b, h, n_angles), "(b, h, n_angles)")
    if n_angles > n // 2:
        raise ValueError(f"angles: expected at most n // 2 = {n // 2} angles per head, got {n_angles}")
    if not isinstance(state, tuple) or len(state) != 4:
        raise TypeError("state: expected a tuple (phi, H, K_prev, x_prev)")
    validate_state("state", state, b, h, p, n, r, n_angles, phi_dtypes=STATE_DTYPES)
    phi, H, K_prev, x_prev = state
    if z is not None:
        expect_tensor("z", z, ndim=3)
        expect_shape("z", z, (b, h, p), "(b, h, p)")
    validate_parameters(h, r, p, n, D, z is not None, B_bias, C_bias, mimo_x, mimo_z, mimo_o)
    if rope_layout is not None:
        expect_choice("rope_layout", rope_layout, ROPE_LAYOUTS)
    expect_same_device(x=x, dt=dt, A=A, B=B, C=C, trap=trap, angles=angles, phi=phi, H=H, K_prev=K_prev,
                       x_prev=x_prev, D=D, z=z, B_bias=B_bias, C_bias=C_bias, mimo_x=mimo_x, mimo_z=mimo_z,
                       mimo_o=mimo_o)


def mamba3_step_reference(x, dt, A, B, C, trap, angles, state, D=None, z=None, B_bias=None, C_bias=None,
                          mimo_x=None, mimo_z=None, mimo_o=None, rope_layout=None) -> torch.Tensor:
    """One Mamba-3 token; the four ``state`` tensors are overwritten in place with the new state.

    The same computation as ``mamba3`` at l = 1 from ``initial_state=state`` (without mimo_o when
    r > 1: the ranks' outputs before mixing). Math in float32 (float64 if any input is float64).
    The in-place state write is not recorded by autograd (a decode cache); y is.

    Args:
        x: (b, h, p) inputs, float16/bfloat16/float32/float64.
        dt: (b, h) step sizes (already softplus-ed and biased). A: (b, h) decay rates, < 0.
        B, C: (b, r, g, n) keys and queries, already RMS-normalised; g divides h.
        trap: (b, h) trapezoid logits. angles: (b, h, n_angles) raw rotary angles.
        state: (phi (b, h, n_angles), H (b, h, p, n), both float32/float64; K_prev (b, r, h, n),
            x_prev (b, h, p)): a :class:`~mambakit.ops.Mamba3State` or the layer's cache tuple.
        D: (h,); z: (b, h, p); B_bias, C_bias: (h, r, n); mimo_x, mimo_z, mimo_o: (h, r, p).
        rope_layout: "interleaved" (default for r = 1) or "halves" (default for r > 1).

    Returns:
        y (b, h, p) in x's dtype, or (b, h, r, p) for r > 1 without ``mimo_o``.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or options.
    """
    validate_step(x, dt, A, B, C, trap, angles, state, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, rope_layout)
    phi, H, K_prev, x_prev = state
    h, r = x.shape[1], B.shape[1]
    layout = rope_layout_for(rope_layout, r)
    cdtype = compute_dtype(x, dt, A, B, C, trap, angles, *state, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o)

    def up(t):
        return None if t is None else t.to(cdtype)

    xc, dtc = up(x), up(dt)
    new_phi = torch.remainder(up(phi) + math.pi * torch.tanh(up(angles)) * dtc[..., None], 2 * math.pi)
    per_group = h // B.shape[2]
    Bh = up(B).repeat_interleave(per_group, dim=2).transpose(1, 2)  # (b, h, r, n)
    Ch = up(C).repeat_interleave(per_group, dim=2).transpose(1, 2)
    if B_bias is not None:
        Bh = Bh + up(B_bias)
    if C_bias is not None:
        Ch = Ch + up(C_bias)
    K = rotate(Bh, new_phi[:, :, None, :], layout)
    Q = rotate(Ch, new_phi[:, :, None, :], layout)
    scale = up(mimo_x) if r > 1 else 1.0
    v = xc[:, :, None, :] * scale  # (b, h, r, p)
    v_prev = up(x_prev)[:, :, None, :] * scale

    lam = torch.sigmoid(up(trap))
    alpha = torch.exp(dtc * up(A))
    gamma, beta = lam * dtc, (1 - lam) * dtc * alpha
    if H.dtype == cdtype and H.is_contiguous() and not grad_needed(x, dt, A, B, C, trap, angles, D, z, B_bias,
                                                                  C_bias, mimo_x, mimo_z, mimo_o):
        # Decoding: H is updated where it lies, the rank sums as batched matrix products over
        # (b h) rows. No (b, h, p, n) temporaries: on a CPU their allocation costs more than the math.
        b, _, p, n = H.shape
        rows = H.view(b * h, p, n)
        rows.mul_(alpha.reshape(b * h, 1, 1))
        rows.baddbmm_((beta[..., None, None] * v_prev).transpose(2, 3).reshape(b * h, p, r),
                      up(K_prev).transpose(1, 2).reshape(b * h, r, n))
        rows.baddbmm_((gamma[..., None, None] * v).transpose(2, 3).reshape(b * h, p, r), K.reshape(b * h, r, n))
        new_H = H
        y = torch.bmm(Q.reshape(b * h, r, n), rows.transpose(1, 2)).view(b, h, r, p)
    else:
        u_prev = torch.einsum("bhrp,bhrn->bhpn", v_prev, up(K_prev).transpose(1, 2))
        u = torch.einsum("bhrp,bhrn->bhpn", v, K)
        # With autograd on, the graph keeps the old state, so it must not alias the tensor written below.
        new_H = (alpha[..., None, None] * H.to(cdtype, copy=torch.is_grad_enabled())
                 + beta[..., None, None] * u_prev + gamma[..., None, None] * u)
        y = torch.einsum("bhpn,bhrn->bhrp", new_H, Q)
    if D is not None:
        y = y + up(D)[:, None, None] * v
    if r == 1:
        y = y[:, :, 0]
        if z is not None:
            y = y * F.silu(up(z))
    else:
        if z is not None:
            y = y * F.silu(up(z)[:, :, None, :] * up(mimo_z))
        if mimo_o is not None:
            y = (y * up(mimo_o)).sum(dim=2)
    with torch.no_grad():
        phi.copy_(new_phi)
        if new_H is not H:
            H.copy_(new_H)
        K_prev.copy_(K.transpose(1, 2))
        x_prev.copy_(x)
    return y.to(x.dtype)


def mamba3_step(x, dt, A, B, C, trap, angles, state, D=None, z=None, B_bias=None, C_bias=None, mimo_x=None,
                mimo_z=None, mimo_o=None, rope_layout=None, backend: str | None = None) -> torch.Tensor:
    """One Mamba-3 decode token, ``state`` updated in place; as :func:`mamba3_step_reference`.

    backend: ``None`` (auto: Triton for CUDA tensors, the reference otherwise; ``MAMBAKIT_BACKEND``
    overrides the auto choice), ``"reference"`` or ``"triton"``. The kernel takes
    float16/bfloat16/float32 inputs with float32 phi and H and has no backward; on auto, float64
    inputs or state, and inputs that need a gradient, run the reference.
    """
    validate_step(x, dt, A, B, C, trap, angles, state, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, rope_layout)
    impl = resolve_backend(backend, x.device)
    if impl == "triton":
        unsupported = step_kernel_unsupported(x, dt, A, B, C, trap, angles, *state, D, z, B_bias, C_bias, mimo_x,
                                              mimo_z, mimo_o)
        if unsupported and backend == "triton":
            raise ValueError(f"backend: the Triton Mamba-3 step does not take {unsupported}; use backend='reference'")
        if unsupported:
            impl = "reference"
    if impl == "reference":
        return mamba3_step_reference(x, dt, A, B, C, trap, angles, state, D, z, B_bias, C_bias, mimo_x, mimo_z,
                                     mimo_o, rope_layout)
    from .step_triton import mamba3_step_triton

    return mamba3_step_triton(x, dt, A, B, C, trap, angles, tuple(state), D, z, B_bias, C_bias, mimo_x, mimo_z,
                              mimo_o, rope_layout_for(rope_layout, B.shape[1]) == "halves")
