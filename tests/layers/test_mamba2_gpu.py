"""Mamba2 on CUDA runs the Triton kernels (conv1d, SSD, gated RMSNorm), agrees with the reference
path, and compiles into one graph (the kernels are custom ops). Skipped without a GPU."""

import pytest
import torch

from mambakit.layers import Mamba2
from tests.utils import assert_all_close, assert_compiles_like_eager, assert_decode_matches_forward, output_and_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _layer_and_input(dtype=torch.bfloat16, **options):
    torch.manual_seed(0)
    layer = Mamba2(256, d_state=64, headdim=32, ngroups=2, chunk_size=128, layer_idx=0, **options).cuda().to(dtype)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=dtype, requires_grad=True)
    return layer, x


@pytest.mark.parametrize("options", [dict(), dict(rmsnorm=False, D_has_hdim=True)], ids=["rmsnorm", "z-in-ssd"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_triton_path_matches_reference_path(monkeypatch, options, packed):
    layer, x = _layer_and_input(**options)
    kwargs = {}
    if packed:
        kwargs["seq_idx"] = (torch.arange(1000, device="cuda") // 300).int().expand(2, -1).contiguous()
    fast = output_and_grads(layer, x, **kwargs)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    slow = output_and_grads(layer, x, **kwargs)
    assert_all_close(fast, slow, 3e-2, "triton vs reference")


def test_torch_compile_without_graph_breaks():
    assert_compiles_like_eager(*_layer_and_input(torch.float32))


def test_prefill_then_one_token_steps_match_the_forward():
    # decoding runs the conv-update and one-step scan kernels; the forward the chunked ones
    layer, x = _layer_and_input(torch.float32)
    assert_decode_matches_forward(layer, x[:, :40].detach(), prefill=29, tol=1e-4)
