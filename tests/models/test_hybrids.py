"""Mixture-of-experts hybrids: the MoE-Mamba and Jamba layouts, decoding through the cache,
checkpoints, parameter counts, and Mamba-1's inner norms (Jamba's RMSNorm on Delta, B and C)."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM, load_pretrained
from mambakit.layers import MHA, GatedMLP, Mamba1, MoE
from mambakit.models import jamba_config, moe_mamba_config


def base(n_layer: int = 8, **kwargs) -> MambaConfig:
    return MambaConfig(d_model=32, n_layer=n_layer, vocab_size=61, d_intermediate=40,
                       ssm_cfg={"layer": "Mamba1", "d_state": 8}, **kwargs)


def test_jamba_layout():
    config = jamba_config(base(16), num_experts=6)
    model = MambaLM(config)
    for i, layer in enumerate(model.backbone.layers):
        assert isinstance(layer.mixer, MHA if i % 8 == 4 else Mamba1), i
        assert isinstance(layer.mlp, MoE if i % 2 == 1 else GatedMLP), i
        if isinstance(layer.mlp, MoE):
            assert (layer.mlp.num_experts, layer.mlp.top_k, layer.mlp.hidden) == (6, 2, 128)  # 40 rounded up to 128
        if isinstance(layer.mixer, Mamba1):
            assert layer.mixer.inner_norms and layer.mixer.b_layernorm.weight.shape == (8,)
        else:
            assert layer.mixer.causal
    with pytest.raises(ValueError, match="multiple of attn_period"):
        jamba_config(base(12))
    with pytest.raises(ValueError, match="d_intermediate"):
        jamba_config(MambaConfig(d_model=32, n_layer=8, vocab_size=61))


def test_moe_mamba_layout_and_active_parameters():
    plain = MambaLM(base(4))
    moe = MambaLM(moe_mamba_config(base(4), num_experts=8))
    assert all(isinstance(layer.mlp, MoE) and layer.mlp.top_k == 1 for layer in moe.backbone.layers)
    router = sum(layer.mlp.router.weight.numel() for layer in moe.backbone.layers)
    # One Switch expert has the parameters of the dense MLP it replaces: equal active parameters.
    assert moe.active_parameters() == plain.active_parameters() + router
    assert plain.active_parameters() == sum(p.numel() for p in plain.parameters())
    expert = sum(p.numel() for p in plain.backbone.layers[0].mlp.parameters())
    assert sum(p.numel() for p in moe.parameters()) == moe.active_parameters() + 4 * 7 * expert
    with pytest.raises(ValueError, match="d_intermediate"):
        moe_mamba_config(MambaConfig(d_model=32, n_layer=2, vocab_size=61))


def test_config_checks():
    with pytest.raises(ValueError, match="moe_layer_idx"):
        base(4, moe_layer_idx=[4])
    with pytest.raises(ValueError, match="inner size"):
        MambaConfig(d_model=32, n_layer=2, vocab_size=61, moe_layer_idx=[0])
    with pytest.raises(TypeError, match="moe_cfg"):
        base(4, moe_cfg=[1])
    for make in (moe_mamba_config, jamba_config):
        with pytest.raises(TypeError, match="base"):
            make({"d_model": 32})


@pytest.mark.parametrize("make", [lambda: moe_mamba_config(base(2)), lambda: jamba_config(base(8), num_experts=4)],
                         ids=["moe-mamba", "jamba"])
def test_prefill_then_steps_equal_full_forward_and_losses(make):
    torch.manual_seed(0)
    model = MambaLM(make()).double().eval()
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_inference_cache(2, 13)
        pieces = [model(ids[:, :5], inference_params=cache)]
        cache.seqlen_offset = 5
        for t in range(5, 13):
            pieces.append(model(ids[:, t:t + 1], inference_params=cache))
            cache.seqlen_offset += 1
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-10
    model.train()
    model(ids)
    aux = model.aux_loss()
    stats = model.expert_stats()
    assert aux is not None and aux.requires_grad and aux.item() > 0
    assert sorted(stats["load"]) == model.config.moe_layer_idx
    for load in stats["load"].values():
        assert sum(load) == pytest.approx(1.0)
    assert MambaLM(base(2)).aux_loss() is None and MambaLM(base(2)).expert_stats() == {}


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MambaLM(jamba_config(base(8), num_experts=4)).eval()
    model.save_pretrained(tmp_path / "jamba", format="mamba_ssm")
    again = load_pretrained(tmp_path / "jamba").eval()
    ids = torch.randint(0, 61, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    with pytest.raises(ValueError, match="experts"):
        model.save_pretrained(tmp_path / "hf", format="hf")


def test_mamba1_inner_norms_make_the_scale_of_b_irrelevant():
    """RMSNorm on B (and C, Delta) removes their scale: scaling x_proj's B rows leaves the output
    unchanged with inner norms (up to the norm's epsilon) and changes it without."""
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    changes = {}
    for inner_norms in (True, False):
        torch.manual_seed(0)
        layer = Mamba1(32, d_state=8, inner_norms=inner_norms).double()
        before = layer(x)
        with torch.no_grad():
            layer.x_proj.weight[layer.dt_rank:layer.dt_rank + 8] *= 7.0
        changes[inner_norms] = ((layer(x) - before).norm() / before.norm()).item()
    assert changes[True] < 1e-4 and changes[False] > 1e-2, changes
