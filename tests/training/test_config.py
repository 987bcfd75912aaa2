import pytest

from mambakit import MambaLM
from mambakit.training import PRESETS, TrainConfig, model_config


@pytest.mark.parametrize("preset, d_model, n_layer", [("130m", 768, 24), ("370m", 1024, 48), ("790m", 1536, 48),
                                                      ("1.4b", 2048, 48)])
def test_paper_presets_have_the_mamba_paper_sizes(preset, d_model, n_layer):
    config = model_config(preset, "mamba1", 50277)
    assert (config.d_model, config.n_layer, config.ssm_cfg) == (d_model, n_layer, {"layer": "Mamba1"})
    assert model_config(preset, "mamba2", 50277).ssm_cfg == {"layer": "Mamba2"}  # official defaults


def test_130m_preset_has_about_130m_parameters():
    import torch

    with torch.device("meta"):
        model = MambaLM(model_config("130m", "mamba1", 50277))
    assert 120e6 < sum(p.numel() for p in model.parameters()) < 140e6


@pytest.mark.parametrize("layer", ["mamba1", "mamba2", "mamba3"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_small_presets_build_for_every_layer(preset, layer):
    config = model_config(preset, layer, 256)
    assert config.ssm_cfg["layer"] == {"mamba1": "Mamba1", "mamba2": "Mamba2", "mamba3": "Mamba3"}[layer]
    assert MambaLM(config).lm_head.weight.shape[0] == 256
    assert set(PRESETS) >= {"tiny", "small", "130m", "1.4b"}


@pytest.mark.parametrize("overrides, flag", [
    (dict(batch_size=0), "--batch-size"), (dict(seq_len=-1), "--seq-len"), (dict(batch_size=6, grad_accum=4), "--batch-size"),
    (dict(lr=0.0), "--lr"), (dict(min_lr=1.0), "--min-lr"), (dict(preset="2b"), "--preset"), (dict(layer="mamba4"), "--layer"),
    (dict(dist="tp"), "--dist"), (dict(stop_at=601, max_steps=600), "--stop-at"), (dict(beta2=1.0), "--beta2"),
    (dict(grad_clip=-1.0), "--grad-clip"), (dict(warmup_steps=-1), "--warmup-steps"),
])
def test_bad_settings_name_the_option(overrides, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**overrides)


def test_architectures():
    build = model_config
    assert build("tiny", "mamba2", 256, mlp_size=16).d_intermediate == 16
    moe = build("tiny", "mamba2", 256, arch="moe-mamba", mlp_size=16, experts=3)
    assert moe.moe_layer_idx == [0, 1] and moe.moe_cfg["num_experts"] == 3 and moe.moe_cfg["top_k"] == 1
    jamba = build("tiny", "mamba2", 256, arch="jamba", mlp_size=16, n_layer=8)
    assert jamba.ssm_cfg["layer"] == "Mamba1" and jamba.moe_cfg["num_experts"] == 16 and jamba.n_layer == 8
    with pytest.raises(ValueError, match="--mlp-size"):
        build("tiny", "mamba1", 256, arch="moe-mamba")
    with pytest.raises(ValueError, match="--arch"):
        TrainConfig(arch="moe")
    with pytest.raises(ValueError, match="--experts"):
        TrainConfig(experts=0)
    with pytest.raises(ValueError, match="--mlp-size"):
        TrainConfig(mlp_size=-1)
