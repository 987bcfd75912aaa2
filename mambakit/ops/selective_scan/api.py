"""The public Mamba-1 selective scan: validates, then runs the Triton kernels or the reference."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .reference import selective_scan_reference, validate


def selective_scan(
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
    backend: str | None = None,
):
    """Mamba-1 selective scan; arguments, shapes and returns as :func:`selective_scan_reference`.

    backend: ``None`` (auto: Triton for CUDA tensors, the reference otherwise; the environment
    variable ``MAMBAKIT_BACKEND`` overrides the auto choice), ``"reference"`` or ``"triton"``.
    The Triton kernels take real or complex64 A and float16/bfloat16/float32 inputs (state math
    in float32); on auto, float64 and complex128 inputs run the reference. ``algorithm``
    selects among the reference's algorithms and is ignored by the kernels.
    """
    validate(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, return_final_state, seq_idx)
    impl = resolve_backend(backend, u.device)
    if impl == "triton":
        unsupported = _triton_unsupported(u, delta, A, B, C, D, z, delta_bias, initial_state)
        if unsupported and backend == "triton":
            raise ValueError(f"backend: the Triton selective scan does not take {unsupported}; use backend='reference'")
        if unsupported:
            impl = "reference"
    if impl == "reference":
        return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                        return_final_state, algorithm, seq_idx)
    from .triton_ops import selective_scan_triton

    return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                 return_final_state, seq_idx)


def _triton_unsupported(*tensors) -> str | None:
    if any(t is not None and t.dtype in (torch.float64, torch.complex128) for t in tensors):
        return "float64/complex128 inputs"
    return None
