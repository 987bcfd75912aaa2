import math

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.layers import MHA, GatedMLP, Mamba1, Mamba2, Mamba3
from tests.fixtures import SSM_CFGS, tiny_config, tiny_model


def test_config_rejects_unknown_fields_and_layers():
    with pytest.raises(ValueError, match=r"config: unknown fields \['d_modle'\]"):
        MambaConfig.from_dict({"d_modle": 8})
    with pytest.raises(ValueError, match=r"ssm_cfg\['layer'\]"):
        MambaConfig(ssm_cfg={"layer": "Mamba4"})
    with pytest.raises(ValueError, match="attn_layer_idx"):
        MambaConfig(n_layer=2, attn_layer_idx=[2])
    with pytest.raises(ValueError, match="d_model"):
        MambaConfig(d_model=0)
    assert MambaConfig.from_dict({"d_model": 8}).n_layer == 64  # missing keys take the defaults


def test_padded_vocab_and_round_trip_dict():
    config = tiny_config(vocab_size=61, pad_vocab_size_multiple=8)
    assert config.padded_vocab_size == 64
    assert MambaConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("kind,mixer_cls", [("mamba1", Mamba1), ("mamba2", Mamba2), ("mamba3", Mamba3)])
def test_structure_and_official_names(kind, mixer_cls):
    model = MambaLM(tiny_config(kind, hybrid=True))
    names = set(model.state_dict())
    assert "backbone.embedding.weight" in names and "backbone.norm_f.weight" in names and "lm_head.weight" in names
    assert isinstance(model.backbone.layers[0].mixer, mixer_cls)
    assert isinstance(model.backbone.layers[1].mixer, MHA)
    assert isinstance(model.backbone.layers[2].mlp, GatedMLP)
    assert {"backbone.layers.1.mixer.in_proj.weight", "backbone.layers.2.norm2.weight", "backbone.layers.2.mlp.fc1.weight",
            "backbone.layers.2.mlp.fc2.weight"} <= names
    assert model.lm_head.weight is model.backbone.embedding.weight  # tied
    assert model.backbone.embedding.weight.shape == (64, 32)


def test_untied_head_and_layer_norm():
    model = MambaLM(tiny_config(tie_embeddings=False, rms_norm=False))
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert isinstance(model.backbone.norm_f, torch.nn.LayerNorm)
    assert "backbone.norm_f.bias" in model.state_dict()


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    n_layer = 4
    model = MambaLM(tiny_config("mamba1", n_layer=n_layer, d_model=64))
    emb = model.backbone.embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.002
    out = model.backbone.layers[0].mixer.out_proj.weight
    bound = 1 / math.sqrt(out.shape[1]) / math.sqrt(n_layer)  # kaiming_uniform(a=sqrt 5) / sqrt(n_layer)
    assert out.abs().max().item() <= bound
    assert out.abs().max().item() > 0.9 * bound
    dt_bias = torch.nn.functional.softplus(model.backbone.layers[0].mixer.dt_proj.bias)
    assert dt_bias.min().item() >= 1e-3 * 0.999 and dt_bias.max().item() <= 0.1 * 1.001  # not zeroed by the init


@pytest.mark.parametrize("kind", list(SSM_CFGS))
@pytest.mark.parametrize("hybrid", [False, True], ids=["pure", "hybrid"])
def test_prefill_then_steps_equal_full_forward(kind, hybrid):
    model = tiny_model(kind, hybrid)
    ids = torch.randint(0, 61, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        for k in (1, 6):
            cache = model.allocate_inference_cache(2, 11)
            pieces = [model(ids[:, :k], inference_params=cache)]
            cache.seqlen_offset = k
            for t in range(k, 11):
                pieces.append(model(ids[:, t : t + 1], inference_params=cache))
                cache.seqlen_offset += 1
            err = (torch.cat(pieces, dim=1) - full).abs().max().item()
            assert err < 1e-10, (k, err)


def test_continuing_with_several_tokens_at_once():
    model = tiny_model("mamba3", hybrid=True)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(1, 12)
        first = model(ids[:, :5], inference_params=cache)
        cache.seqlen_offset = 5
        second = model(ids[:, 5:], inference_params=cache)
    assert (torch.cat([first, second], 1) - full).abs().max().item() < 1e-10


def test_cache_states_are_updated_in_place():
    model = tiny_model("mamba2", hybrid=True)
    cache = model.allocate_inference_cache(2, 8)
    pointers = {i: [t.data_ptr() for t in ts] for i, ts in cache.states.items()}
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 5)), inference_params=cache)
    assert {i: [t.data_ptr() for t in ts] for i, ts in cache.states.items()} == pointers
    assert any(t.abs().sum() > 0 for ts in cache.states.values() for t in ts)
    cache.reset()
    assert all(t.abs().sum() == 0 for ts in cache.states.values() for t in ts) and cache.seqlen_offset == 0


def test_num_last_tokens_and_dtypes():
    model = tiny_model("mamba1", dtype=torch.float32)
    ids = torch.randint(0, 61, (3, 7))
    logits = model(ids)
    assert logits.shape == (3, 7, 64) and logits.dtype == torch.float32
    assert torch.allclose(model(ids, num_last_tokens=2), logits[:, -2:], rtol=1e-5, atol=1e-6)
    model_bf16 = tiny_model("mamba1", dtype=torch.bfloat16)
    out = model_bf16(ids)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - logits).norm() / logits.norm()).item() < 3e-2


def test_bad_input_ids():
    model = tiny_model("mamba1", dtype=torch.float32)
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="config"):
        MambaLM({"d_model": 8})


def test_training_step_reduces_loss():
    model = tiny_model("mamba3", hybrid=True, dtype=torch.float32).train()
    ids = torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
