"""An op's Triton kernels, forward and backward, compiled in parallel on its first call.

Triton compiles a kernel the first time it is launched with a new specialization, one at a time:
the first forward + backward of a Mamba-2 layer spends seconds compiling its ten kernels in a
row, then builds each one's launcher (a C module, compiled by the system compiler) on its first
launch. On an op's first call with a new kind of arguments, :func:`compile_ahead` runs the op's
launchers once with every launch made through :func:`launch` turned into a compile queued to a
thread pool (Triton's ``AsyncCompileMode``), so no Triton kernel executes: the pass only
allocates their outputs, uninitialised. It then loads the compiled kernels (and builds their
launchers) on the same pool and returns; the real launches find everything ready.

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
POOL_THREAD_PREFIX = "mambakit-compile"
# Kinds of arguments already compiled ahead per op; bounded (a process that meets ever new kinds
# starts over, which costs one pass per kind whose compiles are all cache hits).
MAX_KINDS = 4096

# Inside compile_ahead's pass: the list collecting the queued compiles; None otherwise.
_queued = contextvars.ContextVar("mambakit_queued_compiles", default=None)
_kinds_seen: set = set()


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``; inside :func:`compile_ahead` only its compile, queued."""
    queued = _queued.get()
    if queued is None:
        kernel[grid](*args, **meta)
    else:
        compiled = kernel.warmup(*args, grid=grid, **meta)
        if compiled is not None:
            queued.append(compiled)


def enabled() -> bool:
    """Whether compile_ahead acts: not switched off, not interpreting, and a Triton with
    ``AsyncCompileMode`` (3.4 and later)."""
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


def _load(kernel) -> None:
    """Load a compiled kernel onto the device and build its launcher, which Triton otherwise does
    on the kernel's first launch (a private method, so skipped where a Triton version lacks it)."""
    init = getattr(kernel, "_init_handles", None)
    if init is not None:
        init()


def compile_ahead(op: str, launchers: Callable[..., object], *args) -> None:
    """Compile every kernel that ``launchers(*args)`` launches through :func:`launch`, in parallel,
    the first time ``op`` meets arguments of this kind; return when all are built.

    ``launchers`` runs without autograd and without executing any Triton kernel (their outputs
    come back uninitialised); it must launch whatever the real call (forward and, if one will
    follow, backward) will launch. Kernels it misses, or a kind it conflates with an earlier one, still
    compile on first launch.
    """
    if torch.compiler.is_compiling() or _queued.get() is not None or not enabled():
        return
    key = (op, tuple(argument_kind(a) for a in args))
    if key in _kinds_seen:
        return
    if len(_kinds_seen) >= MAX_KINDS:
        _kinds_seen.clear()
    _kinds_seen.add(key)
    import triton

    queued: list = []
    # The pool's threads load kernels onto the current device (where Triton launches).
    with ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix=POOL_THREAD_PREFIX,
                            initializer=torch.cuda.set_device, initargs=(torch.cuda.current_device(),)) as pool:
        with triton.AsyncCompileMode(pool), torch.no_grad():  # leaving it waits for every compile
            token = _queued.set(queued)
            try:
                launchers(*args)
            finally:
                _queued.reset(token)
        # Each compiled kernel once (Triton's loading is not guarded against two threads at once);
        # the warm-ups of kernels already compiled return them compiled.
        compiled = {id(k): k for k in (q.result() if hasattr(q, "result") else q for q in queued)}
        list(pool.map(_load, compiled.values()))
