"""One Mamba-2 decode token (the SSD recurrence at l = 1), updating the state in place.

Per batch and head, with a (p, n) state:

    dt = clamp(softplus(dt + dt_bias), lo, hi)        (each step optional, as :func:`ssd`)
    state = exp(dt A) state + dt x B^T
    y = state C + D x;     y *= silu(z)

:func:`ssd_step_reference` is the definition and the CPU path; :func:`ssd_step` dispatches to the
Triton kernel (``step_triton.py``) for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import resolve_backend, step_kernel_unsupported
from .._checks import compute_dtype, expect_same_device, expect_shape, expect_tensor, grad_needed
from .reference import _discretize_dt, _expect_bool, _expect_dt_limit

STATE_DTYPES = (torch.float32, torch.float64)


def validate_step(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit) -> None:
    """Every input check of :func:`ssd_step`, before any compute."""
    expect_tensor("x", x, ndim=3)
    b, h, p = x.shape
    act = (x.dtype,)  # activations share x's dtype; parameters may differ
    expect_tensor("dt", dt, ndim=2, dtypes=act)
    expect_tensor("A", A, ndim=1)
    expect_tensor("B", B, ndim=3, dtypes=act)
    expect_tensor("C", C, ndim=3, dtypes=act)
    expect_tensor("state", state, ndim=4, dtypes=STATE_DTYPES)
    if D is not None:
        expect_tensor("D", D)
    if z is not None:
        expect_tensor("z", z, ndim=3, dtypes=act)
    if dt_bias is not None:
        expect_tensor("dt_bias", dt_bias, ndim=1)
    _expect_bool("dt_softplus", dt_softplus)
    _expect_dt_limit(dt_limit)

    expect_shape("dt", dt, (b, h), "(b, h)")
    expect_shape("A", A, (h,), "(h,)")
    g, n = B.shape[1], B.shape[2]
    if g == 0 or h % g:
        raise ValueError(f"B: expected a group count g dividing the heads h = {h}, got g = {g}")
    expect_shape("B", B, (b, g, n), "(b, g, n)")
    expect_shape("C", C, (b, g, n), "(b, g, n)")
    expect_shape("state", state, (b, h, p, n), "(b, h, p, n)")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"D: expected shape (h,) = {(h,)} or (h, p) = {(h, p)}, got {tuple(D.shape)}")
    if z is not None:
        expect_shape("z", z, (b, h, p), "(b, h, p)")
    if dt_bias is not None:
        expect_shape("dt_bias", dt_bias, (h,), "(h,)")
    expect_same_device(x=x, dt=dt, A=A, B=B, C=C, state=state, D=D, z=z, dt_bias=dt_bias)


def ssd_step_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """One SSD token; ``state`` is overwritten in place with the new state.

    The same computation as ``ssd(x[:, None], dt[:, None], A, B[:, None], C[:, None], D=D,
    z=z[:, None], ..., initial_states=state, return_final_states=True)``. The math runs in
    float32 (float64 if any input or the state is float64). The in-place state write is not
    recorded by autograd (a decode cache), y is.

    Args:
        x: (b, h, p) inputs, float16/bfloat16/float32/float64.
        dt: (b, h) raw time steps, x's dtype.
        A: (h,) per-head decay rate, any float dtype (meant to be negative).
        B: (b, g, n) input projection, x's dtype; g divides h, head j uses group j // (h // g).
        C: (b, g, n) output projection, x's dtype.
        state: (b, h, p, n) float32 or float64, the state before this token; updated in place.
        D: (h,) or (h, p) skip weight, any float dtype, default None.
        z: (b, h, p) gate, x's dtype, default None; y is multiplied by silu(z) after the skip.
        dt_bias: (h,) added to dt, any float dtype, default None.
        dt_softplus: bool, default False; softplus of dt + dt_bias.
        dt_limit: (lo, hi), default (0.0, inf); dt is clamped only when it differs from the default.

    Returns:
        y (b, h, p) in x's dtype.

    Example:
        >>> b, h, p, g, n = 2, 4, 8, 2, 16
        >>> x, dt, A = torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h)
        >>> B, C, state = torch.randn(b, g, n), torch.randn(b, g, n), torch.zeros(b, h, p, n)
        >>> ssd_step_reference(x, dt, A, B, C, state, dt_softplus=True).shape
        torch.Size([2, 4, 8])

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or option values.
    """
    validate_step(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit)
    cdtype = compute_dtype(x, dt, A, B, C, state, D, z, dt_bias)

    def up(t):
        return None if t is None else t.to(cdtype)

    h = x.shape[1]
    per_group = h // B.shape[1]
    xc = up(x)
    dtc = _discretize_dt(up(dt), up(dt_bias), dt_softplus, dt_limit)  # (b, h)
    Bh = up(B).repeat_interleave(per_group, dim=1)  # (b, h, n)
    Ch = up(C).repeat_interleave(per_group, dim=1)
    decay, update = torch.exp(dtc * up(A)), dtc[..., None] * xc  # (b, h), (b, h, p)
    if state.dtype == cdtype and state.is_contiguous() and not grad_needed(x, dt, A, B, C, D, z, dt_bias):
        # Decoding: the state is updated where it lies, as batched matrix products over (b h)
        # rows. No (b, h, p, n) temporaries: on a CPU their allocation cost ~5x the arithmetic.
        b, _, p, n = state.shape
        rows = state.view(b * h, p, n)
        rows.mul_(decay.reshape(b * h, 1, 1))
        rows.baddbmm_(update.reshape(b * h, p, 1), Bh.reshape(b * h, 1, n))
        new = state
        y = torch.bmm(rows, Ch.reshape(b * h, n, 1)).view(b, h, p)
    else:
        # With autograd on, the graph keeps the old state, so it must not alias the tensor written below.
        old = state.to(cdtype, copy=torch.is_grad_enabled())
        # (b, h, p, 1) * (b, h, 1, n) -> (b, h, p, n)
        new = decay[..., None, None] * old + update[..., None] * Bh[:, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        Dc = up(D)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        y = y * F.silu(up(z))
    if new is not state:
        with torch.no_grad():
            state.copy_(new)
    return y.to(x.dtype)


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    backend: str | None = None,
) -> torch.Tensor:
    """One Mamba-2 decode token, ``state`` updated in place; as :func:`ssd_step_reference`.

    backend: ``None`` (auto: Triton for CUDA tensors, the reference otherwise; the environment
    variable ``MAMBAKIT_BACKEND`` overrides the auto choice), ``"reference"`` or ``"triton"``.
    The kernel takes float16/bfloat16/float32 inputs with a float32 state and has no backward; on
    auto, float64 inputs or state, and inputs that need a gradient, run the reference.
    """
    validate_step(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit)
    impl = resolve_backend(backend, x.device)
    if impl == "triton":
        unsupported = step_kernel_unsupported(x, dt, A, B, C, state, D, z, dt_bias)
        if unsupported and backend == "triton":
            raise ValueError(f"backend: the Triton SSD step does not take {unsupported}; use backend='reference'")
        if unsupported:
            impl = "reference"
    if impl == "reference":
        return ssd_step_reference(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit)
    from .step_triton import ssd_step_triton

    return ssd_step_triton(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit)

