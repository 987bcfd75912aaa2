"""Tests of the norm modules: parameters as the official checkpoints, forward = the op."""

from __future__ import annotations

import pytest
import torch

from mambakit.layers import RMSNorm, RMSNormGated
from mambakit.ops.norm import gated_rms_norm, rms_norm
from tests.utils import assert_close


def rand(seed, *shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


MODULES = {
    "rms_norm": lambda **kw: RMSNorm(24, **kw),
    "rms_norm_gated": lambda **kw: RMSNormGated(24, group_size=8, **kw),
}


@pytest.mark.parametrize("name", list(MODULES), ids=list(MODULES))
def test_parameters_as_official(name):
    module = MODULES[name]()
    params = {k: tuple(v.shape) for k, v in module.named_parameters()}
    assert params == {"weight": (24,)}
    assert list(module.state_dict()) == ["weight"]
    assert torch.equal(module.weight.detach(), torch.ones(24))
    # An official state dict (weight only) loads strictly.
    w = rand(1, 24)
    module.load_state_dict({"weight": w})
    assert torch.equal(module.weight.detach(), w)


@pytest.mark.parametrize("name", list(MODULES), ids=list(MODULES))
def test_device_and_dtype(name):
    module = MODULES[name](device="cpu", dtype=torch.bfloat16)
    assert module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
    meta = MODULES[name](device="meta")
    assert meta.weight.is_meta


def test_defaults():
    assert RMSNorm(8).eps == 1e-5
    gated = RMSNormGated(8)
    assert (gated.eps, gated.group_size, gated.norm_before_gate) == (1e-5, None, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_forward_equals_op(dtype):
    module = RMSNorm(24, eps=1e-3)
    with torch.no_grad():
        module.weight.copy_(rand(2, 24))
    x = rand(3, 2, 5, 24).to(dtype)
    y = module(x)
    assert y.dtype == dtype
    assert torch.equal(y, rms_norm(x, module.weight, eps=1e-3))


@pytest.mark.parametrize("gate", [False, True], ids=["no_z", "z"])
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("group_size", [None, 6], ids=lambda g: f"group{g}")
def test_rms_norm_gated_forward_equals_op(group_size, norm_before_gate, gate):
    module = RMSNormGated(24, eps=1e-4, group_size=group_size, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        module.weight.copy_(rand(4, 24))
    x, z = rand(5, 3, 24), (rand(6, 3, 24) if gate else None)
    y = module(x, z)
    expected = gated_rms_norm(x, module.weight, z, eps=1e-4, group_size=group_size,
                              norm_before_gate=norm_before_gate)
    assert torch.equal(y, expected)
    if gate:  # the module really uses its options: the other gate position differs
        other = gated_rms_norm(x, module.weight, z, eps=1e-4, group_size=group_size,
                               norm_before_gate=not norm_before_gate)
        assert (y - other).abs().max() > 1e-3


def test_gradients_reach_weight():
    module = RMSNormGated(24, group_size=8, norm_before_gate=False)
    x, z = rand(7, 2, 24, dtype=torch.float64), rand(8, 2, 24, dtype=torch.float64)
    module.double()(x, z).square().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    ref_w = torch.ones(24, dtype=torch.float64, requires_grad=True)
    gated_rms_norm(x, ref_w, z, group_size=8).square().sum().backward()
    assert_close(module.weight.grad, ref_w.grad, 1e-14, "weight grad")


@pytest.mark.parametrize("group_size", [5, 0, -4], ids=["not_dividing", "zero", "negative"])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="^group_size:"):
        RMSNormGated(24, group_size=group_size)
