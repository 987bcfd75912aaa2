"""One Mamba-1 decode token through the mixer between its projections, states updated in place.

Per batch row, with x and z the two halves of in_proj's output (d channels each), a conv state of
the last w - 1 inputs and an SSM state (d, n):

    x_c  = silu(conv_bias + sum_k conv_weight[:, k] * [conv_state, x][:, k])   (conv_state shifts)
    dt_low, B, C = split(x_proj_weight @ x_c, [r, n, n])
    dt   = softplus(dt_proj_weight @ dt_low + dt_bias)                          (d,)
    h    = exp(dt A) h + (dt x_c) B^T                                          (d, n)
    y    = (h C + D x_c) * silu(z)

The same computation as ``Mamba1.mix_projected`` for one cached token, whose ops round each
intermediate to the activation dtype; here everything between the loads and y runs in float32.
:func:`mamba1_mixer_step_reference` is the definition and the CPU path; :func:`mamba1_mixer_step`
dispatches to two Triton kernels (``mixer_step_triton.py``) for CUDA tensors: a token that took
five kernels and a state copy per layer takes two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import resolve_backend, step_kernel_unsupported
from .._checks import compute_dtype, expect_same_device, expect_shape, expect_tensor

STATE_DTYPES = (torch.float32, torch.float64)


def validate_mixer_step(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
                        ssm_state) -> None:
    """Every input check of :func:`mamba1_mixer_step`, before any compute."""
    expect_tensor("x", x, ndim=2)
    b, d = x.shape
    expect_tensor("z", z, ndim=2, dtypes=(x.dtype,))
    expect_tensor("conv_state", conv_state, ndim=3)
    expect_tensor("conv_weight", conv_weight, ndim=2)
    expect_tensor("x_proj_weight", x_proj_weight, ndim=2)
    expect_tensor("dt_proj_weight", dt_proj_weight, ndim=2)
    expect_tensor("dt_bias", dt_bias, ndim=1)
    expect_tensor("A", A, ndim=2)
    expect_tensor("ssm_state", ssm_state, ndim=3, dtypes=STATE_DTYPES)
    if conv_bias is not None:
        expect_tensor("conv_bias", conv_bias, ndim=1)
    if D is not None:
        expect_tensor("D", D, ndim=1)
    w, n, r = conv_weight.shape[1], ssm_state.shape[2], dt_proj_weight.shape[1]
    expect_shape("z", z, (b, d), "(b, d)")
    expect_shape("conv_weight", conv_weight, (d, w), "(d, w)")
    expect_shape("conv_state", conv_state, (b, d, w - 1), "(b, d, w - 1)")
    expect_shape("A", A, (d, n), "(d, n)")
    expect_shape("dt_proj_weight", dt_proj_weight, (d, r), "(d, dt_rank)")
    expect_shape("x_proj_weight", x_proj_weight, (r + 2 * n, d), "(dt_rank + 2 n, d)")
    expect_shape("dt_bias", dt_bias, (d,), "(d,)")
    expect_shape("ssm_state", ssm_state, (b, d, n), "(b, d, n)")
    if conv_bias is not None:
        expect_shape("conv_bias", conv_bias, (d,), "(d,)")
    if D is not None:
        expect_shape("D", D, (d,), "(d,)")
    expect_same_device(x=x, z=z, conv_state=conv_state, conv_weight=conv_weight, conv_bias=conv_bias,
                       x_proj_weight=x_proj_weight, dt_proj_weight=dt_proj_weight, dt_bias=dt_bias, A=A, D=D,
                       ssm_state=ssm_state)


@torch.no_grad()
def mamba1_mixer_step_reference(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias,
                                A, D, ssm_state) -> torch.Tensor:
    """One Mamba-1 token between in_proj and out_proj; ``conv_state`` and ``ssm_state`` are
    overwritten in place. No autograd (a decode cache).

    Args:
        x, z: (b, d) the conv input and the gate (in_proj's two halves), one dtype.
        conv_state: (b, d, w - 1) the last w - 1 conv inputs, oldest first; updated in place.
        conv_weight: (d, w) depthwise conv taps (the last one multiplies x); conv_bias (d,) or None.
        x_proj_weight: (dt_rank + 2 n, d); dt_proj_weight: (d, dt_rank); dt_bias: (d,).
        A: (d, n) decay rates (negative); D: (d,) skip weight or None.
        ssm_state: (b, d, n) float32 or float64; updated in place.

    Returns:
        y (b, d) in x's dtype. The math runs in float32 (float64 if any input is float64).

    Example:
        >>> b, d, n, r, w = 2, 8, 4, 2, 4
        >>> y = mamba1_mixer_step_reference(
        ...     torch.randn(b, d), torch.randn(b, d), torch.zeros(b, d, w - 1), torch.randn(d, w), None,
        ...     torch.randn(r + 2 * n, d), torch.randn(d, r), torch.zeros(d), -torch.rand(d, n), None,
        ...     torch.zeros(b, d, n))
        >>> y.shape
        torch.Size([2, 8])
    """
    validate_mixer_step(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
                        ssm_state)
    cdtype = compute_dtype(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
                           ssm_state)

    def up(t):
        return None if t is None else t.to(cdtype)

    window = torch.cat([up(conv_state), up(x)[..., None]], dim=-1)  # (b, d, w)
    pre = (window * up(conv_weight)).sum(-1)
    xc = F.silu(pre if conv_bias is None else pre + up(conv_bias))
    conv_state.copy_(window[..., 1:])
    r, n = dt_proj_weight.shape[1], A.shape[1]
    dt_low, B, C = torch.split(xc @ up(x_proj_weight).t(), [r, n, n], dim=-1)  # (b, r), (b, n), (b, n)
    dt = F.softplus(dt_low @ up(dt_proj_weight).t() + up(dt_bias))  # (b, d)
    h = torch.exp(dt[..., None] * up(A)) * up(ssm_state) + (dt * xc)[..., None] * B[:, None, :]
    y = (h * C[:, None, :]).sum(-1)
    if D is not None:
        y = y + up(D) * xc
    ssm_state.copy_(h)
    return (y * F.silu(up(z))).to(x.dtype)


def mamba1_mixer_step(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
                      ssm_state, backend: str | None = None) -> torch.Tensor:
    """One Mamba-1 decode token, states updated in place; as :func:`mamba1_mixer_step_reference`.

    backend: ``None`` (auto: Triton for CUDA tensors, the reference otherwise; ``MAMBAKIT_BACKEND``
    overrides), ``"reference"`` or ``"triton"``. The kernels take float16/bfloat16/float32 inputs,
    a float32 ``ssm_state``, contiguous states and channels at unit stride in x and z, and have no
    backward; on auto, anything else runs the reference.
    """
    validate_mixer_step(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D,
                        ssm_state)
    impl = resolve_backend(backend, x.device)
    if impl == "triton":
        tensors = (x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias, A, D, ssm_state)
        unsupported = step_kernel_unsupported(*tensors)
        if unsupported is None and not (conv_state.is_contiguous() and ssm_state.is_contiguous()):
            unsupported = "non-contiguous states (they are updated in place)"
        if unsupported is None and not (x.stride(1) == 1 and z.stride(1) == 1):
            unsupported = "x or z whose channels are not at unit stride"
        if unsupported and backend == "triton":
            raise ValueError(f"backend: the Triton Mamba-1 mixer step does not take {unsupported}; "
                             "use backend='reference'")
        if unsupported:
            impl = "reference"
    if impl == "reference":
        return mamba1_mixer_step_reference(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight,
                                           dt_bias, A, D, ssm_state)
    from .mixer_step_triton import mamba1_mixer_step_triton

    return mamba1_mixer_step_triton(x, z, conv_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_bias,
                                    A, D, ssm_state)
