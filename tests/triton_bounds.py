"""Out-of-bounds checks for Triton kernels run in Triton's interpreter (the CPU path of the tests).

Inside :func:`bounds_checked`, every load, store and atomic a kernel makes (the lanes its mask
keeps) must fall inside the storage of one of the launch's tensor arguments; anything else raises
:class:`OutOfBounds` naming the kernel. On a GPU such an access is a wrong read at best and an
"illegal memory access" at worst; the interpreter reads host memory and would never say.
"""

from __future__ import annotations

import contextlib

import numpy as np
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


def _storage_spans(args) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) in bytes of the storages of the tensors among args, sorted by start."""
    spans = sorted({(s.data_ptr(), s.data_ptr() + s.nbytes()) for s in
                    (a.untyped_storage() for a in args if hasattr(a, "untyped_storage"))})
    return np.array([s for s, _ in spans], dtype=np.uint64), np.array([e for _, e in spans], dtype=np.uint64)


@contextlib.contextmanager
def bounds_checked():
    """Check every interpreted kernel launch inside the block (see the module docstring)."""
    launch = {}  # the current launch: kernel name and its arguments' storage spans
    real_init = interpreter.GridExecutor._init_args_hst
    builder = interpreter.InterpreterBuilder
    real = {name: getattr(builder, name) for name in
            ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = real_init(self, args_dev, kwargs)
        launch["kernel"] = self.fn.__name__
        launch["spans"] = _storage_spans(list(args_hst) + list(kwargs_hst.values()))
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        addresses = ptrs.data.astype(np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(mask.data, addresses.shape)]
        addresses = addresses.ravel()
        if addresses.size == 0:
            return
        starts, ends = launch["spans"]
        owner = np.searchsorted(starts, addresses, side="right") - 1
        inside = (owner >= 0) & (addresses + np.uint64(itemsize) <= ends[np.maximum(owner, 0)])
        if not inside.all():
            bad = addresses[~inside]
            raise OutOfBounds(f"{launch['kernel']}: {what} of {bad.size} of {addresses.size} elements outside "
                              f"every tensor argument (first at {int(bad[0]):#x})")

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "load")
        return real["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "store")
        return real["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, rmw_op, ptr, val, mask, sem, scope):
        check(ptr, mask, "atomic")
        return real["create_atomic_rmw"](self, rmw_op, ptr, val, mask, sem, scope)

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        check(ptr, None, "atomic")
        return real["create_atomic_cas"](self, ptr, cmp, val, sem, scope)

    interpreter.GridExecutor._init_args_hst = init_args
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    try:
        yield
    finally:
        interpreter.GridExecutor._init_args_hst = real_init
        for name, fn in real.items():
            setattr(builder, name, fn)
