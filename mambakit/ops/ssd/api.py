"""The public Mamba-2 SSD scan: validates, then runs the Triton kernels or the reference."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .reference import ssd_reference, validate


def ssd(
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
    backend: str | None = None,
):
    """Mamba-2 SSD scan; arguments, shapes and returns as :func:`ssd_reference`.

    backend: ``None`` (auto: Triton for CUDA tensors, the reference otherwise; the environment
    variable ``MAMBAKIT_BACKEND`` overrides the auto choice), ``"reference"`` or ``"triton"``.
    The Triton kernels take float16/bfloat16/float32 inputs (state math in float32); on auto,
    float64 inputs run the reference. They cut the sequence into chunks of the largest power of
    two <= ``chunk_size`` within [16, 128] (the chunk changes rounding only; 128 was faster than
    256 on the H200 forward and backward), and ignore
    ``algorithm``, which selects among the reference's algorithms.
    """
    validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
             return_final_states, algorithm)
    impl = resolve_backend(backend, x.device)
    if impl == "triton" and any(t is not None and t.dtype == torch.float64
                                for t in (x, dt, A, B, C, D, z, dt_bias, initial_states)):
        if backend == "triton":
            raise ValueError("backend: the Triton SSD does not take float64 inputs; use backend='reference'")
        impl = "reference"
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                             seq_idx, return_final_states, algorithm)
    from .triton_ops import ssd_triton

    return ssd_triton(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx,
                      return_final_states)
