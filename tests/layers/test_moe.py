"""The mixture-of-experts layer against a token-by-token loop over each token's chosen experts:
routing, weights, capacity and dropping, the load-balancing loss and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import MoE
from tests.utils import assert_close


def make_moe(seed: int, **kwargs) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(16, hidden_features=24, multiple_of=8, **kwargs).double()
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)  # routing far from uniform, so ties never decide
    return moe


def loop_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through its top-k experts one at a time, without any capacity."""
    out = torch.zeros_like(x)
    for i, token in enumerate(x.reshape(-1, x.shape[-1])):
        probs = torch.softmax(moe.router.weight @ token, dim=-1)
        top = probs.topk(moe.top_k)
        weights = top.values / top.values.sum() if moe.top_k > 1 else top.values
        for w, e in zip(weights, top.indices):
            value, gate = (token @ moe.fc1[e]).chunk(2)
            out.view(-1, x.shape[-1])[i] += w * ((value * F.silu(gate)) @ moe.fc2[e])
    return out


@pytest.mark.parametrize("top_k,num_experts", [(1, 4), (2, 8), (3, 5)])
def test_eval_mode_matches_token_loop_with_gradients(top_k, num_experts):
    moe = make_moe(top_k, num_experts=num_experts, top_k=top_k).eval()
    x = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    expected = loop_reference(moe, x)
    assert_close(out, expected, 1e-12, "output")
    assert float(moe.last_dropped) == 0.0
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, moe.fc1, moe.fc2, moe.router.weight], grad_out)
    want = torch.autograd.grad(expected, [x, moe.fc1, moe.fc2, moe.router.weight], grad_out)
    for name, g, w in zip(["x", "fc1", "fc2", "router"], got, want):
        assert_close(g, w, 1e-12, f"d{name}")


def test_capacity_drops_latest_assignments_first():
    """All tokens prefer expert 0: in training it keeps the first C of them (C from the capacity
    factor); the later ones get no output (the residual carries them)."""
    moe = make_moe(0, num_experts=4, top_k=1, capacity_factor=1.0).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 5.0
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    x[..., 0] = x[..., 0].abs() + 1.0  # the router's only nonzero input column: expert 0 wins
    out = moe(x)
    capacity = math.ceil(1.0 * 1 * 12 / 4)
    assert capacity == 3
    expected = loop_reference(moe, x)
    assert_close(out[:, :capacity], expected[:, :capacity], 1e-12, "kept tokens")
    assert torch.equal(out[:, capacity:], torch.zeros_like(out[:, capacity:]))
    assert float(moe.last_dropped) == pytest.approx(9 / 12)
    assert moe.last_load.tolist() == [1.0, 0.0, 0.0, 0.0]  # load counts assignments before the capacity cut
    moe.eval()  # eval mode never drops
    assert_close(moe(x), expected, 1e-12, "eval")


def test_second_choices_yield_to_first_choices():
    """Top-2, capacity for exactly one token per expert: every token's first choice is kept before
    any token's second choice takes a slot."""
    moe = make_moe(1, num_experts=2, top_k=2, capacity_factor=0.5).train()  # C = ceil(0.5 * 2 * 2 / 2) = 1
    x = torch.randn(1, 2, 16, dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 1] = 4.0, 4.0
        x[0, 0, 0], x[0, 0, 1] = 1.0, -1.0  # token 0: expert 0 first, expert 1 second
        x[0, 1, 0], x[0, 1, 1] = -1.0, 1.0  # token 1: expert 1 first, expert 0 second
    out = moe(x)
    probs = torch.softmax(x[0] @ moe.router.weight.t(), -1)
    for t, e in ((0, 0), (1, 1)):
        value, gate = (x[0, t] @ moe.fc1[e]).chunk(2)
        only_first = probs[t, e] / probs[t].sum() * ((value * F.silu(gate)) @ moe.fc2[e])
        assert_close(out[0, t], only_first, 1e-12, f"token {t}")
    assert float(moe.last_dropped) == pytest.approx(0.5)


def test_load_balancing_loss_value_and_gradient():
    moe = make_moe(2, num_experts=4, top_k=2, aux_loss_coef=0.1).train()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    moe(x)
    probs = torch.softmax(x.reshape(-1, 16) @ moe.router.weight.t(), -1)
    chosen = probs.topk(2, -1).indices
    fraction = torch.stack([(chosen == e).double().sum() for e in range(4)]) / chosen.numel()
    assert_close(moe.last_load, fraction, 1e-12, "load")
    assert moe.aux_loss.item() == pytest.approx(0.1 * 4 * (fraction * probs.mean(0)).sum().item(), rel=1e-12)
    (router_grad,) = torch.autograd.grad(moe.aux_loss, [moe.router.weight])
    assert router_grad.abs().sum() > 0  # the balancing loss trains the router
    # Balanced routing gives exactly aux_loss_coef: uniform probabilities, equal loads.
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(1, 8, 16, dtype=torch.float64))
    assert moe.aux_loss.item() == pytest.approx(0.1 * 4 * (moe.last_load * 0.25).sum().item())


def test_bf16_autocast_and_bad_arguments():
    moe = MoE(16, num_experts=4, top_k=2, hidden_features=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moe(torch.randn(2, 5, 16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 16) and torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="top_k"):
        MoE(16, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        MoE(16, num_experts=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(16, capacity_factor=0)
    with pytest.raises(ValueError, match="hidden_states"):
        moe(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="hidden_states"):
        moe(torch.zeros(2, 5, 16, dtype=torch.long))
