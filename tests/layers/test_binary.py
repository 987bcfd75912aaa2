"""1-bit linear layers: the formula, the straight-through gradient, swapping a model's Mamba
projections, and the packed export loading back with identical outputs."""

import pytest
import torch
import torch.nn as nn

from mambakit.layers import BinaryLinear, binarize_projections, pack_binary, unpack_binary
from mambakit.models import MambaConfig, MambaLM


def test_binary_weight_formula_and_init_from_linear():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    layer = BinaryLinear.from_linear(linear)
    W = linear.weight.detach()
    beta = W.mean(0)
    alpha = (W - beta).abs().mean(0)
    expected = alpha * torch.where(W >= 0, 1.0, -1.0) + beta
    torch.testing.assert_close(layer.binary_weight(), expected)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ expected.T + linear.bias.detach())


def test_straight_through_gradient_is_clipped():
    layer = BinaryLinear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -2.0, 0.1], [-0.3, 1.5, -0.9]]))
        layer.alpha.fill_(1.0)
        layer.beta.zero_()
    layer(torch.ones(1, 3)).sum().backward()
    # d out / d W_hat = 1 everywhere, times alpha = 1, passed only where |W| <= 1.
    assert layer.weight.grad.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    assert layer.alpha.grad is not None and layer.beta.grad is not None


def _small_lm(layer: str) -> MambaLM:
    mixer = {"layer": layer, "d_state": 8}
    if layer != "Mamba1":
        mixer.update(headdim=8, chunk_size=4)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=32, ssm_cfg=mixer))


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2", "Mamba3"])
def test_binarize_swaps_only_the_mixer_projections(layer):
    torch.manual_seed(1)
    model = _small_lm(layer)
    replaced = binarize_projections(model)
    expected = [f"backbone.layers.{i}.mixer.{p}" for i in range(2) for p in ("in_proj", "out_proj")]
    assert sorted(replaced) == sorted(expected)
    binary = {n for n, m in model.named_modules() if isinstance(m, BinaryLinear)}
    assert binary == set(replaced)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, BinaryLinear)


def test_packed_export_loads_back_with_identical_outputs():
    torch.manual_seed(2)
    model = _small_lm("Mamba1")
    binarize_projections(model)
    with torch.no_grad():  # move the latent weights and scales away from their init, as training would
        for module in model.modules():
            if isinstance(module, BinaryLinear):
                module.weight.add_(0.05 * torch.randn_like(module.weight))
                module.alpha.mul_(1.3)
    packed = pack_binary(model)
    first = "backbone.layers.0.mixer.in_proj"
    out, inp = packed[f"{first}.shape"].tolist()
    assert packed[f"{first}.sign_bits"].dtype == torch.uint8
    assert packed[f"{first}.sign_bits"].numel() == -(-out * inp // 8)  # 1 bit per weight

    restored = _small_lm("Mamba1")
    binarize_projections(restored)
    full_precision = {k: v for k, v in model.state_dict().items()
                      if not any(k.startswith(name) for name in
                                 (n for n, m in model.named_modules() if isinstance(m, BinaryLinear)))}
    restored.load_state_dict(full_precision, strict=False)
    unpack_binary(restored, packed)
    tokens = torch.randint(0, 32, (2, 11))
    with torch.no_grad():
        assert torch.equal(restored(tokens), model(tokens))


def test_unpack_errors():
    torch.manual_seed(3)
    model = _small_lm("Mamba1")
    binarize_projections(model)
    packed = pack_binary(model)
    with pytest.raises(KeyError, match="binary layer"):
        unpack_binary(model, {})
    bad = dict(packed)
    bad["backbone.layers.0.mixer.in_proj.shape"] = torch.tensor([1, 1])
    with pytest.raises(ValueError, match="shape"):
        unpack_binary(model, bad)


def test_config_flag_builds_binary_projections_and_round_trips(tmp_path):
    from mambakit import load_pretrained

    torch.manual_seed(4)
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=32, ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8},
                         binary_projections=True)
    model = MambaLM(config)
    assert sum(isinstance(m, BinaryLinear) for m in model.modules()) == 4
    model.save_pretrained(tmp_path, format="mamba_ssm")
    loaded = load_pretrained(tmp_path)
    assert loaded.config.binary_projections
    tokens = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(ValueError, match="1-bit"):
        model.save_pretrained(tmp_path / "hf", format="hf")
    with pytest.raises(TypeError, match="binary_projections"):
        MambaConfig(d_model=16, n_layer=1, vocab_size=32, binary_projections=1)
