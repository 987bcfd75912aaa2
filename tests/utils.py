"""Comparison helpers and an op recorder shared by the tests."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; inf if either holds NaN/inf."""
    actual = torch.view_as_real(actual) if actual.is_complex() else actual
    expected = torch.view_as_real(expected) if expected.is_complex() else expected
    actual, expected = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        return float("inf")
    denom = expected.norm().item()
    return (actual - expected).norm().item() / max(denom, 1e-30)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Shapes equal and relative error (NaN rejected) at most ``tol``."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_all_close(actual, expected, tol: float, what: str = "") -> None:
    """assert_close, compared in float32, for each pair of two sequences of tensors."""
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert_close(a.float(), e.float(), tol, f"{what}[{i}]")


def output_and_grads(module, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """[module(x, **kwargs), gradients of mean(output^2) with respect to x and every parameter]."""
    out = module(x, **kwargs)
    grads = torch.autograd.grad(out.float().square().mean(), [x] + list(module.parameters()))
    return [out] + list(grads)


def assert_compiles_like_eager(layer, x: torch.Tensor, tol: float = 1e-4) -> None:
    """torch.compile(layer, fullgraph=True) traces without a graph break and gives the eager
    output and gradients."""
    compiled = torch.compile(layer, fullgraph=True)
    assert_all_close(output_and_grads(compiled, x), output_and_grads(layer, x), tol, "compiled vs eager")


def prefill_then_steps(layer, x: torch.Tensor, prefill: int):
    """A cached prefill of x[:, :prefill], then one-token forwards: (the outputs (b, l, d), copies
    of the first layer's cached states)."""
    from mambakit.cache import InferenceCache

    cache = InferenceCache(max_batch_size=x.shape[0], max_seqlen=x.shape[1])
    outs = [layer(x[:, :prefill], inference_params=cache)]
    for t in range(prefill, x.shape[1]):
        cache.seqlen_offset = t
        outs.append(layer(x[:, t : t + 1], inference_params=cache))
    return torch.cat(outs, dim=1), [s.clone() for s in cache.states[0]]


def assert_decode_matches_forward(layer, x: torch.Tensor, prefill: int, tol: float) -> None:
    """A cached prefill of x[:, :prefill] followed by one-token forwards gives the full forward."""
    with torch.no_grad():
        full = layer(x)
        stepped, _ = prefill_then_steps(layer, x, prefill)
    assert_close(stepped, full, tol, "prefill + one-token steps")


def assert_raises_starting(call, error: type, start: str) -> None:
    """``call()`` raises ``error`` whose message starts with ``start``."""
    try:
        call()
    except error as err:
        assert str(err).startswith(start), str(err)
    else:
        raise AssertionError(f"expected {error.__name__} starting {start!r}, nothing raised")


class OpRecorder(TorchDispatchMode):
    """Records the (op, args) of every top-level op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        return func(*args, **(kwargs or {}))
