"""CUDA-graph decoding: which models it takes (CPU), and that it gives eager decoding's tokens,
captures once per batch size, and follows weight changes (GPU)."""

import pytest
import torch

from mambakit.cuda_graphs import GraphedDecoder, graph_supported, graphed_decoder
from mambakit.models.lm import MambaLM
from tests.fixtures import tiny_config, tiny_model


@pytest.mark.parametrize("kind, hybrid, supported", [
    ("mamba1", False, True), ("mamba2", False, True), ("mamba2", True, True), ("mamba3", False, True),
    ("mamba3-mimo", False, True)])
def test_graph_supported(kind, hybrid, supported):
    model = tiny_model(kind, hybrid)
    assert graph_supported(model) is supported


def test_moe_is_not_capturable_and_cpu_models_are_refused():
    moe = MambaLM(tiny_config("mamba1", moe_layer_idx=[1], d_intermediate=16, moe_cfg=dict(num_experts=2, top_k=1)))
    assert not graph_supported(moe)
    with pytest.raises(ValueError, match="without MoE"):
        GraphedDecoder(moe)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedDecoder(tiny_model("mamba2"))


@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "mamba3", "mamba3-mimo", "mamba2-attention-hybrid"])
@pytest.mark.parametrize("prompts", [[[5, 17, 3, 44, 9]], [[(7 * i) % 61 for i in range(40)]] * 2,
                                     [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [40]]],
                         ids=["short-one", "long-two", "ragged-three"])  # graph, chunked and row-wise prefills
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graphed_decoding_gives_the_eager_tokens(kind, prompts):
    hybrid = kind.endswith("-attention-hybrid")
    model = tiny_model(kind.removesuffix("-attention-hybrid"), hybrid, dtype=torch.float32).cuda()
    eager = model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=False)
    assert model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=True) == eager
    decoder = graphed_decoder(model)
    (key, captured), = decoder.captured.items()
    assert key == (len(prompts), 256 if hybrid else 1)  # attention: a key/value length bucket
    assert model.generate(prompts, max_new_tokens=20, temperature=0) == eager  # graphs: the default on CUDA
    assert graphed_decoder(model) is decoder and decoder.captured[key].graph is captured.graph

    with torch.no_grad():  # in place: values derived from the weights change, so recaptured
        for p in model.parameters():
            p.mul_(1.1)
    eager = model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=False)
    assert model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=None) == eager
    assert graphed_decoder(model) is not decoder

    model.to(torch.float64)  # new storage: recaptured
    eager = model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=False)
    assert model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=None) == eager
    assert graphed_decoder(model) is not decoder
