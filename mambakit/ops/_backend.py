"""Which implementation runs an op: the PyTorch reference or the Triton kernels.

Auto: Triton for CUDA tensors (when Triton imports), the reference otherwise. Override per call
with ``backend="reference" | "triton"`` or for the process with ``MAMBAKIT_BACKEND``. Triton on
CPU tensors needs its interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ._checks import grad_needed

BACKENDS = ("auto", "reference", "triton")

# Looked up once, without importing triton (a CPU-only install never pays for it), and a plain
# constant so that torch.compile traces the dispatch without guards on a cached call.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0: launchers' host arithmetic in plain Python (``triton.cdiv``
    is a constexpr function in Triton 3.9 and costs microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``, in plain Python."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (looked up once)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def requested_backend(backend: str | None) -> str:
    """The backend asked for: ``backend`` itself, else ``MAMBAKIT_BACKEND``, else "auto" (not
    validated: :func:`resolve_backend` does that)."""
    return backend if backend is not None else os.environ.get("MAMBAKIT_BACKEND", "auto")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """-> "reference" or "triton"; raises ValueError when the requested backend cannot run."""
    choice = requested_backend(backend)
    if choice not in BACKENDS:
        source = "backend" if backend is not None else "MAMBAKIT_BACKEND"
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "reference"
    if choice == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' requested but the triton package is not installed")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend: 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    return choice


def step_kernel_unsupported(*tensors) -> str | None:
    """Why a decode-step kernel (float16/bfloat16/float32 only, no backward) cannot take these
    tensors, or None when it can."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return "float64 inputs or state"
    if grad_needed(*tensors):
        return "inputs that require grad (the kernel has no backward)"
    return None
