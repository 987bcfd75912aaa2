"""``project(linear, x)``: an ``nn.Linear`` applied to x, through oneDNN on the CPU at inference.

Each decoded token multiplies one row by every weight of the model, which makes the weight
matrices' read speed the token rate. For one or a few rows, PyTorch's float32 CPU path
(``F.linear`` -> MKL) read weights at ~16 GB/s on the 2-core AMD EPYC development machine. oneDNN's
matrix product on a weight reordered once to its blocked layout read them at ~60 GB/s there, in
float32 with float32 accumulation (benchmarks/NOTES.md, "CPU decode: weights through oneDNN").
So, where it applies, the reordered weight is kept (one more copy of it in memory, in a table
outside the module, so that copying or saving the module is unaffected) and rebuilt when the
parameter changes; it goes when the module does.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules import module as module_globals

_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
# Smallest weight (elements) that goes through oneDNN: a call costs ~25 us more than F.linear's
# there, which only the faster weight reads repay. One row, 24 distinct weights (out of cache), 2
# cores of the AMD EPYC machine: 1536 x 80 (Mamba-1's x_proj) 36 against 14 us, 48 x 1536
# (dt_proj) 28 against 11, 768 x 256 a tie (48-51 against 53-57), 768 x 384 61 against 89-95,
# 768 x 3072 410 against 727.
MIN_ONEDNN_WEIGHT_ELEMENTS = 1 << 18


# module -> (weak reference to the weight tensor, its storage, its in-place version, the weight
# reordered for oneDNN): valid while the module holds that same tensor object, unchanged.
_REORDERED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()


def _reorder(weight: Tensor) -> Tensor:
    """weight (out, in) float32 in oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def has_forward_hooks(module: nn.Module) -> bool:
    """Forward hooks on ``module`` or on every module (which ``project`` must not bypass)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module_globals._global_forward_hooks
                or module_globals._global_forward_pre_hooks)


def onednn_applies(linear: nn.Module, x: Tensor) -> bool:
    """Whether :func:`project` takes oneDNN: a plain ``nn.Linear`` without forward hooks (its own
    or global ones) of at least MIN_ONEDNN_WEIGHT_ELEMENTS weights, float32 CPU input and weight,
    no autograd and no ``torch.compile`` tracing, oneDNN enabled (``torch.backends.mkldnn.enabled``)
    and not switched off by ``MAMBAKIT_CPU_ONEDNN=0``, and no process group: under FSDP (gloo,
    CPU) the reordered copy went stale, an evaluation loss 0.4% off, since the weights FSDP
    gathers are refilled without a change the object/storage/version check sees."""
    # The cheap tests that fail for a decode token's small products come first.
    return (type(linear) is nn.Linear and linear.weight.numel() >= MIN_ONEDNN_WEIGHT_ELEMENTS
            and x.dtype == torch.float32 and x.device.type == "cpu"
            and linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu"
            and not torch.is_grad_enabled() and _ONEDNN and torch.backends.mkldnn.enabled
            and not has_forward_hooks(linear) and not torch.compiler.is_compiling()
            and os.environ.get("MAMBAKIT_CPU_ONEDNN", "1") != "0"
            and not (dist.is_available() and dist.is_initialized()))


def project(linear: nn.Module, x: Tensor) -> Tensor:
    """``linear(x)`` for x (..., in_features) -> (..., out_features); the same product through a
    oneDNN-reordered copy of the weight where :func:`onednn_applies`."""
    if not onednn_applies(linear, x):
        if type(linear) is nn.Linear and not torch.is_grad_enabled() and not has_forward_hooks(linear):
            return F.linear(x, linear.weight, linear.bias)  # what the module's call would do, without its overhead
        return linear(x)
    global _ONEDNN
    weight = linear.weight
    entry = _REORDERED.get(linear)
    if entry is None or entry[0]() is not weight or entry[1:3] != (weight.data_ptr(), weight._version):
        try:
            entry = (weakref.ref(weight), weight.data_ptr(), weight._version, _reorder(weight))
        except RuntimeError as err:  # a oneDNN build without this CPU's kernels: F.linear from now on
            warnings.warn(f"mambakit: oneDNN could not reorder a linear weight ({err}); using F.linear")
            _ONEDNN = False
            return linear(x)
        _REORDERED[linear] = entry
    return torch.ops.mkldnn._linear_pointwise(x, entry[3], linear.bias, "none", [], "")
