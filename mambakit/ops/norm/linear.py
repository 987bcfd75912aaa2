"""The gated RMSNorm and the projection after it, for a few decode rows: Mamba-2's output path
``out_proj(rms_grouped(y * silu(z)) * norm_weight)`` in one Triton kernel.

At batch 1 a decode token of a 130M-class Mamba-2 spends most of its time in launch latency: the
norm and the matrix-vector product after it are two kernels of a few microseconds each, a layer.
In the fused kernel each program computes its row's norm itself (a few thousand values, read
from L2) before its weight tile's product, so the normed activations never go to memory. The
normed values round to the activation dtype before the product, as the two separate ops do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import resolve_backend, step_kernel_unsupported
from .._checks import expect_same_device, expect_shape, expect_tensor
from .api import gated_rms_norm
from .reference import gated_rms_norm_reference, validate_gated_rms_norm

# Widest group the kernel takes (a program holds one group of one row), and most values
# (rows x d) a call may have: every program recomputes its row's norm, so the fused kernel pays
# only for a few rows. On an H200 (24 calls in a CUDA graph) it took 3.7 / 4.2 / 4.9 us against
# the two ops' 9.8-10.4 at 1 / 2 / 4 rows of d 1536 and 7.8 / 11.5 against 13.0 / 13.4 at 1 / 2
# rows of d 4096, but 15.2 against 13.3 at 3 rows of d 4096, and 16.5 against 15.5 for one row
# with a group of 5120 (padded to 8192); benchmarks/NOTES.md, "Mamba-2 decode: the output norm
# and out_proj in one kernel". Past either limit the dispatcher runs the two ops.
MAX_FUSED_GROUP_SIZE = 4096
MAX_FUSED_ROW_VALUES = 8192


def validate_gated_rms_norm_linear(x, z, norm_weight, weight, bias, eps, group_size) -> int:
    """Every input check of :func:`gated_rms_norm_linear_reference`; -> the group size."""
    expect_tensor("x", x, ndim=2)
    expect_tensor("z", z, ndim=2)
    group_size = validate_gated_rms_norm(x, norm_weight, z, eps, group_size, False)
    expect_tensor("weight", weight, ndim=2)
    d = x.shape[1]
    if weight.shape[1] != d:
        raise ValueError(f"weight: expected shape (n_out, d) with d = {d} (x's channels), got {tuple(weight.shape)}")
    if bias is not None:
        expect_tensor("bias", bias, ndim=1)
        expect_shape("bias", bias, (weight.shape[0],), "(n_out,) as weight's rows")
    for name, t in (("z", z), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype}, got {t.dtype}")
    expect_same_device(x=x, weight=weight, bias=bias)
    return group_size


def gated_rms_norm_linear_reference(x, z, norm_weight, weight, bias=None, eps: float = 1e-5,
                                    group_size: int | None = None) -> torch.Tensor:
    """``F.linear(gated_rms_norm_reference(x, norm_weight, z, eps, group_size), weight, bias)``.

    Args:
        x, z: (b, d) activations and gate, float16/bfloat16/float32/float64, one dtype.
        norm_weight: (d,) the norm's scale, any float dtype.
        weight: (n_out, d) the projection, x's dtype; bias: (n_out,) x's dtype, or None.
        eps: finite float >= 0; group_size: positive divisor of d, default None (one group).

    Returns:
        (b, n_out) in x's dtype. The norm is ``norm_before_gate=False`` (Mamba-2's).

    Example:
        >>> x, z = torch.randn(2, 12), torch.randn(2, 12)
        >>> gated_rms_norm_linear_reference(x, z, torch.ones(12), torch.randn(5, 12), group_size=4).shape
        torch.Size([2, 5])
    """
    validate_gated_rms_norm_linear(x, z, norm_weight, weight, bias, eps, group_size)
    return F.linear(gated_rms_norm_reference(x, norm_weight, z, eps, group_size), weight, bias)


def fused_kernel_unsupported(x, z, norm_weight, weight, bias, group_size) -> str | None:
    """Why the fused kernel cannot take these (validated) inputs, or None when it can."""
    unsupported = step_kernel_unsupported(x, z, norm_weight, weight, bias)
    if unsupported is None and x.numel() > MAX_FUSED_ROW_VALUES:
        unsupported = f"more than {MAX_FUSED_ROW_VALUES} values in x (rows x d, got {tuple(x.shape)})"
    if unsupported is None and group_size > MAX_FUSED_GROUP_SIZE:
        unsupported = f"groups wider than {MAX_FUSED_GROUP_SIZE} channels (got {group_size})"
    return unsupported


def gated_rms_norm_linear(x, z, norm_weight, weight, bias=None, eps: float = 1e-5, group_size: int | None = None,
                          backend: str | None = None) -> torch.Tensor:
    """Gated RMSNorm then a linear projection; arguments, shapes and returns as
    :func:`gated_rms_norm_linear_reference`. x and z may be row-strided views (channels at unit
    stride are read in place).

    backend: ``None`` (auto), ``"reference"`` or ``"triton"``. On auto, CUDA inputs without
    autograd, up to MAX_FUSED_ROW_VALUES values (rows x d) and groups up to MAX_FUSED_GROUP_SIZE
    take the fused kernel; anything else runs :func:`gated_rms_norm` then ``F.linear`` (gradients flow there).
    ``backend="triton"`` with inputs the kernel cannot take raises ValueError.
    """
    group_size = validate_gated_rms_norm_linear(x, z, norm_weight, weight, bias, eps, group_size)
    impl = resolve_backend(backend, x.device)
    if impl == "triton":
        unsupported = fused_kernel_unsupported(x, z, norm_weight, weight, bias, group_size)
        if unsupported and backend == "triton":
            raise ValueError(f"backend: the fused Triton norm + projection does not take {unsupported}; "
                             "use backend='reference'")
        if unsupported is None:
            from .linear_triton import gated_rms_norm_linear_triton

            return gated_rms_norm_linear_triton(x, z, norm_weight, weight, bias, eps, group_size)
    norm_backend = "reference" if impl == "reference" else None
    return F.linear(gated_rms_norm(x, norm_weight, z, eps, group_size, backend=norm_backend), weight, bias)
