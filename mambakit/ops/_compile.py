"""An op's Triton kernels, forward and backward, compiled in parallel on its first call.

Triton compiles a kernel the first time it is launched with a new specialization, one at a time:
the first forward + backward of a Mamba-2 layer spends seconds compiling its ten kernels in a
row. On an op's first call with a new kind of arguments, :func:`compile_ahead` runs the op's
launchers once on meta copies of the arguments (no memory, nothing executed), with every launch
made through :func:`launch` turned into a compile queued to a thread pool (Triton's
``AsyncCompileMode``), and returns when all are built; the real launches then find them cached.

``MAMBAKIT_PARALLEL_COMPILE=0`` turns it off (kernels then compile serially on first launch, as
Triton does by default). Skipped under Triton's interpreter and while ``torch.compile`` traces.
"""

from __future__ import annotations

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from ._backend import interpreting

COMPILE_THREADS = 8
# Kinds of arguments already compiled ahead per op; bounded (a process that meets ever new kinds
# starts over, which costs one pass per kind whose compiles are all cache hits).
MAX_KINDS = 4096

_compile_only = contextvars.ContextVar("mambakit_compile_only", default=False)
_kinds_seen: set = set()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; inside :func:`compile_ahead` only its compile, queued."""
    if _compile_only.get():
        kernel.warmup(*args, grid=grid, **meta)
    else:
        kernel[grid](*args, **meta)


def enabled() -> bool:
    import triton

    return (os.environ.get("MAMBAKIT_PARALLEL_COMPILE", "1") != "0" and not interpreting()
            and hasattr(triton, "AsyncCompileMode"))


def _size_class(v: int) -> int:
    """How Triton specializes an integer: 1, a multiple of 16 (as 16), or neither (0)."""
    return 1 if v == 1 else 16 if v % 16 == 0 else 0


def argument_kind(value):
    """A cheap hashable summary of one argument (it runs on every call): tensors by dtype and
    rank, integers by how Triton specializes them, other values as themselves. Coarser than
    Triton's specializations (sizes and alignment are left out), so a later call may still compile
    a variant on first launch."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.dim()
    if isinstance(value, bool) or not isinstance(value, int):
        return value
    return "int", _size_class(value)


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with t's dtype, size, strides and storage offset (so its data_ptr modulo 16 is
    t's, for a t whose storage starts aligned, as every CUDA allocation does)."""
    base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), device="meta", dtype=t.dtype)
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def compile_ahead(op: str, launchers: Callable[..., object], *args) -> None:
    """Compile every kernel that ``launchers(*args)`` launches through :func:`launch`, in parallel,
    the first time ``op`` meets arguments of this kind; return when all are built.

    ``launchers`` runs on meta copies of the tensor arguments, without autograd, and must launch
    whatever the real call (forward and, if it will follow, backward) will launch. Kernels it
    misses (or a kind it conflates with an earlier one) still compile on first launch.
    """
    if _compile_only.get() or torch.compiler.is_compiling() or not enabled():
        return
    key = (op, tuple(argument_kind(a) for a in args))
    if key in _kinds_seen:
        return
    if len(_kinds_seen) >= MAX_KINDS:
        _kinds_seen.clear()
    _kinds_seen.add(key)
    import triton

    meta_args = [meta_like(a) if isinstance(a, torch.Tensor) else a for a in args]
    with ThreadPoolExecutor(COMPILE_THREADS) as pool, triton.AsyncCompileMode(pool), torch.no_grad():
        token = _compile_only.set(True)
        try:
            launchers(*meta_args)
        finally:
            _compile_only.reset(token)
