import math

import pytest

from mambakit import MambaLM
from mambakit.training import TrainConfig, model_config
from mambakit.training.optim import build_optimizer, lr_factor, no_decay


@pytest.mark.parametrize("layer", ["mamba1", "mamba2", "mamba3"])
def test_weight_decay_skips_embeddings_norms_biases_and_ssm_parameters(layer):
    model = MambaLM(model_config("tiny", layer, 256))
    exempt = {name for name, p in model.named_parameters() if no_decay(name, p)}
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), exempt)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    names = {name: id(p) in decayed for name, p in model.named_parameters()}
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert len(decayed) + len(optimizer.param_groups[1]["params"]) == len(names)
    for name, decays in names.items():
        last = name.split(".")[-1]
        if last in ("A_log", "D", "dt_bias", "bias", "B_bias", "C_bias") or "norm" in name or "embedding" in name:
            assert not decays, name
        if name.endswith(("in_proj.weight", "out_proj.weight", "x_proj.weight", "dt_proj.weight")):
            assert decays, name


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert [lr_factor(s, cfg) for s in range(3)] == [0.1, 0.2, 0.3]
    assert lr_factor(9, cfg) == 1.0 and lr_factor(10, cfg) == 1.0
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    values = [lr_factor(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert not math.isnan(lr_factor(0, TrainConfig(warmup_steps=0, max_steps=1)))
