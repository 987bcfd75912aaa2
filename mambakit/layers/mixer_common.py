"""Helpers the three Mamba mixers share: input checks, cache access, state dtypes, dt init."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def check_hidden_states(hidden_states, d_model: int) -> tuple[int, int]:
    """Reject anything but a (b, l, d_model) float tensor with l >= 1; return (b, l)."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states: expected a float tensor, got {hidden_states.dtype}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != d_model or hidden_states.shape[1] == 0:
        raise ValueError(
            f"hidden_states: expected shape (b, l, d_model) with d_model = {d_model} and l >= 1, "
            f"got {tuple(hidden_states.shape)}"
        )
    return hidden_states.shape[0], hidden_states.shape[1]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of recurrent (SSM) states: float32, or float64 for a float64 model (the ops' rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cached_states(module: nn.Module, inference_params, batch: int) -> tuple[torch.Tensor, ...]:
    """This layer's state tensors in ``inference_params`` (allocated on first use), cut to ``batch`` rows.

    The rows are views of the stored tensors, so writing into them updates the cache in place.
    """
    if module.layer_idx is None:
        raise ValueError("layer_idx: the layer needs a layer_idx to use an inference cache, got None")
    states = inference_params.states.get(module.layer_idx)
    if states is None:
        states = module.allocate_inference_cache(inference_params.max_batch_size, inference_params.max_seqlen)
        inference_params.states[module.layer_idx] = states
    if batch > states[0].shape[0]:
        raise ValueError(
            f"hidden_states: batch {batch} exceeds the {states[0].shape[0]} rows of the inference cache"
        )
    return tuple(t[:batch] for t in states)


@torch.no_grad()
def write_states(states: tuple[torch.Tensor, ...], finals) -> None:
    """Copy the final states into the cache tensors in place (their storage never changes, which is
    what CUDA-graph capture needs); the copies are detached, so decoding never grows a graph."""
    for stored, final in zip(states, finals):
        stored.copy_(final)


def derived_parameter(module: nn.Module, name: str, compute, *sources: torch.Tensor):
    """``compute()`` (a tensor or a tuple of tensors made from the parameters ``sources``, e.g.
    A = -exp(A_log)), remembered on ``module`` while no source changes: the same tensors, at the
    same storage, dtype and in-place version (a replaced parameter can reuse the address of the
    one it replaced).

    Decoding runs a layer once per token; recomputing such values each time costs a few kernel
    launches per layer, a large share of a batch-1 token. With autograd on (or inside
    torch.compile) nothing is remembered: the value must stay on the graph.
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return compute()
    key = tuple((t.data_ptr(), t.dtype, t._version) for t in sources)
    memo = module.__dict__.setdefault("_derived_parameters", {})
    held = memo.get(name)  # (key, value, the sources themselves)
    if held is None or held[0] != key or any(old is not t for old, t in zip(held[2], sources)):
        memo[name] = (key, compute(), sources)
    return memo[name][1]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Parameters such as A_log in float32, or float64 when they are float64 (as the official
    ``A_log.float()``, without rounding a float64 model)."""
    return t if t.dtype == torch.float64 else t.float()


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None, dtype=None):
    """Bias b with softplus(b) log-uniform in [dt_min, dt_max], floored at dt_init_floor."""
    dt = torch.exp(
        torch.rand(n, device=device, dtype=dtype) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), stable for small dt.
    return dt + torch.log(-torch.expm1(-dt))
