"""Normalisations of the Mamba blocks: the reference and the CPU path.

All act on the last axis (the channels, size d) of x (..., d):

    rms_norm(x)        = x / sqrt(mean(x^2) + eps) * weight
    layer_norm(x)      = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
    gated_rms_norm     = rms_norm per group of channels of x * silu(z) (norm_before_gate=False),
                         or of x, then times silu(z) (norm_before_gate=True)
    add_norm_reference = the pre-norm block input: residual += x, then norm(residual)

The statistics run in float32 (float64 if an input is float64) and outputs return in the input's
dtype, as the official ``mamba_ssm`` kernels (``rms_norm_fn``, ``layer_norm_fn``, ``rmsnorm_fn``
of ``layernorm_gated``) whose semantics these follow. The public ``rms_norm``, ``gated_rms_norm`` and
``add_norm`` (``api.py``) run these references or the Triton kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import (
    compute_dtype,
    expect_choice,
    expect_positive_int,
    expect_same_device,
    expect_shape,
    expect_tensor,
)

KINDS = ("rms", "layer")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _expect_input(name, x):
    expect_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected shape (..., d) with d >= 1, got {tuple(x.shape)}")
    return x.shape[-1]


def _expect_param(name, value, d):
    expect_tensor(name, value, ndim=1)
    expect_shape(name, value, (d,), "(d,)")


def _expect_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not eps >= 0 or math.isinf(eps):  # also rejects NaN
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def _expect_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def _expect_group_size(group_size, d):
    if group_size is None:
        return d
    expect_positive_int("group_size", group_size)
    if d % group_size:
        raise ValueError(f"group_size: expected a divisor of d = {d}, got {group_size}")
    return group_size


def validate_rms_norm(x, weight, eps) -> None:
    """Every input check of :func:`rms_norm_reference`, before any compute."""
    d = _expect_input("x", x)
    _expect_param("weight", weight, d)
    _expect_eps(eps)
    expect_same_device(x=x, weight=weight)


def validate_gated_rms_norm(x, weight, z, eps, group_size, norm_before_gate) -> int:
    """Every input check of :func:`gated_rms_norm_reference`, before any compute; -> the group size
    (d for None)."""
    d = _expect_input("x", x)
    _expect_param("weight", weight, d)
    if z is not None:
        expect_tensor("z", z)
        expect_shape("z", z, tuple(x.shape), "(..., d) as x")
    _expect_eps(eps)
    group_size = _expect_group_size(group_size, d)
    _expect_bool("norm_before_gate", norm_before_gate)
    expect_same_device(x=x, weight=weight, z=z)
    return group_size


# ----------------------------------------------------------------------------------------------
# Math on already validated, already up-cast tensors
# ----------------------------------------------------------------------------------------------


def _rms_normalize(x, eps, group_size):
    """x (..., d) -> x / rms over each contiguous group of group_size channels, no weight."""
    d = x.shape[-1]
    xg = x.unflatten(-1, (d // group_size, group_size))  # (..., d / gs, gs)
    rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    return (xg * rstd).flatten(-2)


def _layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last axis: ``x * rsqrt(mean(x^2, -1) + eps) * weight``.

    Args:
        x: (..., d) float16/bfloat16/float32/float64, d >= 1.
        weight: (d,) scale, any float dtype.
        eps: finite float >= 0, default 1e-5, added to the mean square.

    Returns:
        (..., d) in x's dtype, computed in float32 (float64 if x or weight is float64).

    Example:
        >>> x = torch.randn(2, 10, 64, dtype=torch.bfloat16)
        >>> y = rms_norm_reference(x, torch.ones(64))
        >>> y.dtype, y.float().square().mean(-1).mean().round()
        (torch.bfloat16, tensor(1.))

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or values.
    """
    validate_rms_norm(x, weight, eps)
    cdtype = compute_dtype(x, weight)
    y = _rms_normalize(x.to(cdtype), eps, x.shape[-1]) * weight.to(cdtype)
    return y.to(x.dtype)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last axis: ``(x - mean) * rsqrt(var + eps) * weight + bias``.

    The variance is the biased one (divided by d), as ``torch.nn.LayerNorm``.

    Args:
        x: (..., d) float16/bfloat16/float32/float64, d >= 1.
        weight: (d,) scale, any float dtype.
        bias: (d,) shift, any float dtype, default None (no shift).
        eps: finite float >= 0, default 1e-5, added to the variance.

    Returns:
        (..., d) in x's dtype, computed in float32 (float64 if any input is float64).

    Example:
        >>> x = torch.randn(2, 10, 64)
        >>> y = layer_norm(x, torch.ones(64), torch.zeros(64))
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (64,)), atol=1e-6)
        True

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or values.
    """
    d = _expect_input("x", x)
    _expect_param("weight", weight, d)
    if bias is not None:
        _expect_param("bias", bias, d)
    _expect_eps(eps)
    expect_same_device(x=x, weight=weight, bias=bias)
    cdtype = compute_dtype(x, weight, bias)
    y = _layer_norm(x.to(cdtype), weight.to(cdtype), None if bias is None else bias.to(cdtype), eps)
    return y.to(x.dtype)


def gated_rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """Gated, grouped RMSNorm: the output norm of Mamba-2 (official ``rmsnorm_fn`` semantics).

    The channels are split into contiguous groups of ``group_size``; each group is divided by
    its own root mean square. With a gate z:

    - ``norm_before_gate=False`` (default, Mamba-2): ``rms_grouped(x * silu(z)) * weight``;
    - ``norm_before_gate=True``: ``rms_grouped(x) * weight * silu(z)``.

    Without z it is a plain grouped RMSNorm.

    Args:
        x: (..., d) float16/bfloat16/float32/float64, d >= 1.
        weight: (d,) scale, any float dtype.
        z: (..., d) gate, x's shape, any float dtype, default None (no gate).
        eps: finite float >= 0, default 1e-5, added to each group's mean square.
        group_size: positive int dividing d, default None (one group of all d channels).
            Mamba-2 uses d / ngroups so that statistics never mix channels of two groups (which
            keeps them local to one tensor-parallel shard).
        norm_before_gate: bool, default False; where the gate is applied, see above.

    Returns:
        (..., d) in x's dtype, computed in float32 (float64 if any input is float64).

    Example:
        >>> x, z = torch.randn(2, 10, 12), torch.randn(2, 10, 12)
        >>> y = gated_rms_norm_reference(x, torch.ones(12), z, group_size=4)
        >>> g = (x * torch.nn.functional.silu(z)).view(2, 10, 3, 4)
        >>> torch.allclose(y, (g * torch.rsqrt(g.square().mean(-1, True) + 1e-5)).view(2, 10, 12), atol=1e-6)
        True

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or values (e.g. group_size not dividing d).
    """
    group_size = validate_gated_rms_norm(x, weight, z, eps, group_size, norm_before_gate)
    cdtype = compute_dtype(x, weight, z)
    xc = x.to(cdtype)
    gate = None if z is None else F.silu(z.to(cdtype))
    if gate is not None and not norm_before_gate:
        xc = xc * gate
    y = _rms_normalize(xc, eps, group_size) * weight.to(cdtype)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


def add_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    kind: str = "rms",
    residual_in_fp32: bool = False,
):
    """Residual add + norm, the input of a pre-norm block (official ``Block``, unfused path).

    ``new_residual = x + residual`` (just x when residual is None), then
    ``normed = norm(new_residual.to(weight.dtype))``: the norm sees the sum rounded to the
    weight's dtype and returns in it, as the official block does.

    - ``residual_in_fp32=True``: the addition runs in float32 and new_residual stays float32
      (float64 if x or residual is float64: never rounded below the inputs' precision); the
      norm's input is that sum.
    - ``residual_in_fp32=False``: new_residual is the sum rounded once to x's dtype, and the norm
      sees that rounded value.

    Args:
        x: (..., d) the sub-layer output (or the embeddings), float16/bfloat16/float32/float64.
        residual: (..., d) the running residual stream, x's shape, any float dtype, or None
            (the first block).
        weight: (d,) norm scale, any float dtype; sets the dtype of ``normed``.
        bias: (d,) norm shift, any float dtype, default None; only with kind="layer".
        eps: finite float >= 0, default 1e-5.
        kind: "rms" (default, :func:`rms_norm_reference`) or "layer" (:func:`layer_norm`).
        residual_in_fp32: bool, default False; keep the residual stream in float32.

    Returns:
        (normed (..., d) in weight's dtype, new_residual (..., d) in float32 if
        residual_in_fp32 (float64 for float64 inputs) else in x's dtype).

    Example:
        >>> x, w = torch.randn(2, 10, 64, dtype=torch.bfloat16), torch.ones(64)
        >>> normed, residual = add_norm_reference(x, None, w, residual_in_fp32=True)
        >>> normed2, residual = add_norm_reference(x, residual, w, residual_in_fp32=True)
        >>> normed2.dtype, residual.dtype
        (torch.float32, torch.float32)

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: wrong shapes, devices or option values.
    """
    validate_add_norm(x, residual, weight, bias, eps, kind, residual_in_fp32)
    if residual_in_fp32:
        add_dtype = compute_dtype(x, residual)
        total = x.to(add_dtype) if residual is None else x.to(add_dtype) + residual.to(add_dtype)
        new_residual = total
    else:
        # One rounding to x's dtype (the sum itself is formed in the promoted dtype).
        new_residual = x if residual is None else (x + residual).to(x.dtype)
        total = new_residual

    inp = total.to(weight.dtype)
    cdtype = compute_dtype(inp, weight, bias)
    if kind == "rms":
        normed = _rms_normalize(inp.to(cdtype), eps, x.shape[-1]) * weight.to(cdtype)
    else:
        normed = _layer_norm(inp.to(cdtype), weight.to(cdtype), None if bias is None else bias.to(cdtype), eps)
    return normed.to(weight.dtype), new_residual


def validate_add_norm(x, residual, weight, bias, eps, kind, residual_in_fp32) -> None:
    """The checks of :func:`add_norm_reference` (shared with the Triton path)."""
    d = _expect_input("x", x)
    if residual is not None:
        expect_tensor("residual", residual)
        expect_shape("residual", residual, tuple(x.shape), "(..., d) as x")
    _expect_param("weight", weight, d)
    expect_choice("kind", kind, KINDS)
    if bias is not None:
        if kind != "layer":
            raise ValueError(f"bias: only used with kind='layer', got a bias with kind={kind!r}")
        _expect_param("bias", bias, d)
    _expect_eps(eps)
    _expect_bool("residual_in_fp32", residual_in_fp32)
    expect_same_device(x=x, residual=residual, weight=weight, bias=bias)
