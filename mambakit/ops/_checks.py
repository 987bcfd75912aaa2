"""Input validation shared by every public op.

Every check runs before any computation and raises a ``TypeError`` (wrong type or dtype) or a
``ValueError`` (wrong shape, device or value) whose message names the argument and says what was
expected. Nothing is cast, broadcast or truncated silently.
"""

from __future__ import annotations

from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def expect_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``value`` is a tensor of one of ``dtypes`` with ``ndim`` dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name}: expected {ndim} dimensions, got {value.dim()} (shape {tuple(value.shape)})"
        )
    return value


def expect_shape(name: str, value: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    """Check ``value.shape == expected``; ``layout`` names the axes, e.g. ``"(b, l, h)"``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(
            f"{name}: expected shape {layout} = {tuple(expected)}, got {tuple(value.shape)}"
        )


def expect_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """Check that all given (non-None) tensors live on one device and return it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{name}: expected device {first.device} (the device of {first_name}), got {t.device}"
            )
    return first.device


def expect_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def expect_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def grad_needed(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records an op on these tensors: grad mode on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype state math runs in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32
