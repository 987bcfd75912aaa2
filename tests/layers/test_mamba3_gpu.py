"""Mamba3 (SISO and MIMO, one or packed sequences) on CUDA runs the Triton state-space core, agrees with the reference path, decodes
consistently with a prefill, and compiles into one graph. Skipped without a GPU."""

import pytest
import torch

from mambakit.cache import InferenceCache
from mambakit.layers import Mamba3
from tests.utils import assert_all_close, assert_compiles_like_eager, output_and_grads

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _layer_and_input(dtype=torch.bfloat16, rope_fraction=0.5, **options):
    torch.manual_seed(0)
    layer = Mamba3(256, d_state=64, headdim=32, rope_fraction=rope_fraction, layer_idx=0, **options).cuda().to(dtype)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=dtype, requires_grad=True)
    return layer, x


@pytest.mark.parametrize("rope_fraction", [0.5, 1.0])
@pytest.mark.parametrize("mimo", [False, True], ids=["siso", "mimo4"])
@pytest.mark.parametrize("packed", [False, True], ids=["one-sequence", "packed"])
def test_triton_path_matches_reference_path(monkeypatch, rope_fraction, mimo, packed):
    layer, x = _layer_and_input(rope_fraction=rope_fraction, is_mimo=mimo)
    kwargs = {}
    if packed:
        kwargs["seq_idx"] = (torch.arange(1000, device="cuda") // 300).int().expand(2, -1).contiguous()
    fast = output_and_grads(layer, x, **kwargs)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    slow = output_and_grads(layer, x, **kwargs)
    assert_all_close(fast, slow, 3e-2, "triton vs reference")


def test_prefill_then_steps_equal_full_forward():
    layer, x = _layer_and_input(torch.float32)
    x = x.detach()[:, :70]
    with torch.no_grad():
        full = layer(x)
        cache = InferenceCache(max_batch_size=2, max_seqlen=70)
        pieces = [layer(x[:, :50], inference_params=cache)]
        cache.seqlen_offset = 50
        for t in range(50, 70):
            pieces.append(layer(x[:, t:t + 1], inference_params=cache))
            cache.seqlen_offset += 1
    err = ((torch.cat(pieces, 1) - full).norm() / full.norm()).item()
    assert err < 1e-4, err


def test_torch_compile_without_graph_breaks():
    assert_compiles_like_eager(*_layer_and_input(torch.float32))
