"""Mamba1 on CUDA runs the Triton selective scan, agrees with the reference path, and compiles
into one graph (the kernels are custom ops). Skipped without a GPU."""

import pytest
import torch

from mambakit.layers import Mamba1
from tests.utils import assert_all_close, assert_compiles_like_eager, assert_decode_matches_forward, output_and_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _layer_and_input(dtype=torch.bfloat16):
    torch.manual_seed(0)
    layer = Mamba1(256, d_state=16, layer_idx=0).cuda().to(dtype)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=dtype, requires_grad=True)
    return layer, x


def test_triton_path_matches_reference_path(monkeypatch):
    layer, x = _layer_and_input()
    fast = output_and_grads(layer, x)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    slow = output_and_grads(layer, x)
    assert_all_close(fast, slow, 3e-2, "triton vs reference")


def test_torch_compile_without_graph_breaks():
    assert_compiles_like_eager(*_layer_and_input(torch.float32))


def test_prefill_then_one_token_steps_match_the_forward():
    # decoding runs the conv-update and one-step scan kernels; the forward the chunked ones
    layer, x = _layer_and_input(torch.float32)
    assert_decode_matches_forward(layer, x[:, :40].detach(), prefill=29, tol=1e-4)
