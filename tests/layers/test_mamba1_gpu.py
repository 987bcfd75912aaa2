"""Mamba1 on CUDA runs the Triton selective scan, agrees with the reference path, and compiles
into one graph (the kernels are custom ops). Skipped without a GPU."""

import pytest
import torch

from mambakit.layers import Mamba1

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _layer_and_input(dtype=torch.bfloat16):
    torch.manual_seed(0)
    layer = Mamba1(256, d_state=16, layer_idx=0).cuda().to(dtype)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=dtype, requires_grad=True)
    return layer, x


def _grads(layer, x):
    out = layer(x)
    grads = torch.autograd.grad(out.float().square().mean(), [x] + list(layer.parameters()))
    return [out] + list(grads)


def test_triton_path_matches_reference_path(monkeypatch):
    layer, x = _layer_and_input()
    fast = _grads(layer, x)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    slow = _grads(layer, x)
    for a, b in zip(fast, slow):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 3e-2, err


def test_torch_compile_without_graph_breaks():
    layer, x = _layer_and_input(torch.float32)
    compiled = torch.compile(layer, fullgraph=True)
    eager = _grads(layer, x)
    traced = _grads(compiled, x)
    for a, b in zip(traced, eager):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-4, err
