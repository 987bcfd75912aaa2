"""The public Mamba-3 op: validates, then runs the Triton path or the reference."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .reference import mamba3_reference, validate


def mamba3(x, dt, A, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None, mimo_x=None, mimo_z=None,
           mimo_o=None, initial_state=None, return_final_state: bool = False, chunk_size: int = 64,
           algorithm: str = "chunked", rope_layout: str | None = None, backend: str | None = None,
           seq_idx=None):
    """Mamba-3 sequence mixing; arguments, shapes and returns as :func:`mamba3_reference`.

    backend: ``None`` (auto: Triton for CUDA tensors, the reference otherwise; ``MAMBAKIT_BACKEND``
    overrides the auto choice), ``"reference"`` or ``"triton"``. The Triton path covers SISO and
    MIMO with float16/bfloat16/float32 inputs: the phase and rotation run in their own kernels, the
    trapezoid weights and the same-step scores are elementwise PyTorch, the state-space core runs
    the SSD kernels with a per-token decay (over l r rank-tokens for MIMO), the skip, gate and
    rank mixing one epilogue kernel, and ``algorithm`` is ignored. On auto, float64 inputs run the reference.
    """
    validate(x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, initial_state, chunk_size,
             algorithm, rope_layout, seq_idx)
    impl = resolve_backend(backend, x.device)
    if impl == "triton":
        tensors = (x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, *(initial_state or ()))
        if any(t is not None and t.dtype == torch.float64 for t in tensors):
            if backend == "triton":
                raise ValueError("backend: the Triton Mamba-3 does not take float64 inputs; use backend='reference'")
            impl = "reference"
    if impl == "reference":
        return mamba3_reference(x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o,
                                initial_state, return_final_state, chunk_size, algorithm, rope_layout, seq_idx)
    from .triton_ops import mamba3_triton

    return mamba3_triton(x, dt, A, B, C, trap, angles, D, z, B_bias, C_bias, mimo_x, mimo_z, mimo_o, initial_state,
                         return_final_state, chunk_size, rope_layout, seq_idx)
