"""The public causal conv1d and its decode step: validate, then Triton (CUDA) or the reference."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .reference import causal_conv1d_reference, causal_conv1d_update_reference, validate_conv, validate_update


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False,
                  seq_idx=None, backend: str | None = None):
    """Causal depthwise conv1d; arguments, shapes and returns as :func:`causal_conv1d_reference`.

    backend: None (auto: Triton for CUDA tensors, else the reference; ``MAMBAKIT_BACKEND``
    overrides), ``"reference"`` or ``"triton"``. float64 inputs run the reference on auto.
    """
    validate_conv(x, weight, bias, activation, initial_state, return_final_state, seq_idx)
    impl = resolve_backend(backend, x.device)
    if impl == "triton" and _float64(x, weight, bias, initial_state):
        if backend == "triton":
            raise ValueError("backend: the Triton conv1d does not take float64 inputs; use backend='reference'")
        impl = "reference"
    if impl == "reference":
        return causal_conv1d_reference(x, weight, bias, activation, initial_state, return_final_state, seq_idx)
    from .triton_ops import causal_conv1d_triton

    return causal_conv1d_triton(x, weight, bias, activation, initial_state, return_final_state, seq_idx)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, backend: str | None = None):
    """One decode step, ``conv_state`` updated in place; as :func:`causal_conv1d_update_reference`."""
    validate_update(x, conv_state, weight, bias, activation)
    impl = resolve_backend(backend, x.device)
    if impl == "triton" and (_float64(x, conv_state, weight, bias) or not conv_state.is_contiguous()):
        if backend == "triton":
            raise ValueError("backend: the Triton conv1d update takes a contiguous, non-float64 conv_state")
        impl = "reference"
    if impl == "reference":
        return causal_conv1d_update_reference(x, conv_state, weight, bias, activation)
    from .triton_ops import causal_conv1d_update_triton

    return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)


def _float64(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)
