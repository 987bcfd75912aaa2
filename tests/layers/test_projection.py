"""mambakit.layers.projection.project: nn.Linear through oneDNN on float32 CPU inference, the same
values as F.linear; autograd, other dtypes, subclasses and hooked modules keep nn.Linear's own path."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mambakit.layers import projection
from mambakit.layers.projection import onednn_applies, project

needs_onednn = pytest.mark.skipif(not projection._ONEDNN, reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True)
def any_weight_size(monkeypatch):
    """The small layers of these tests take oneDNN too (test_small_weights_keep_f_linear excepted)."""
    monkeypatch.setattr(projection, "MIN_ONEDNN_WEIGHT_ELEMENTS", 0)


def packed(linear):
    return linear in projection._REORDERED


def assert_matches_f_linear(y, linear, x):
    torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [(1,), (3, 5), (2, 1, 7)])
def test_inference_matches_f_linear(bias, rows):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias)
    x = torch.randn(*rows, 96)
    with torch.no_grad():
        y = project(linear, x)
    assert packed(linear)
    assert y.shape == (*rows, 200)
    assert_matches_f_linear(y, linear, x)


@needs_onednn
def test_strided_inputs_match_f_linear():
    linear = nn.Linear(24, 40)
    x = torch.randn(2, 24, 9).transpose(1, 2)  # (b, l, d) view of (b, d, l), as Mamba-1's x_proj gets
    with torch.no_grad():
        assert_matches_f_linear(project(linear, x), linear, x)
    assert packed(linear)


@needs_onednn
def test_a_changed_weight_is_reordered_again():
    linear = nn.Linear(32, 48)
    x = torch.randn(4, 32)
    with torch.no_grad():
        before = project(linear, x)
        linear.weight.mul_(-2.0)  # in place: same storage, new version
        after = project(linear, x)
    assert_matches_f_linear(after, linear, x)
    assert not torch.allclose(before, after)


@needs_onednn
def test_a_replaced_weight_is_reordered_again():
    linear = nn.Linear(32, 48)
    x = torch.randn(4, 32)
    with torch.no_grad():
        project(linear, x)
        linear.weight = nn.Parameter(torch.randn(48, 32))  # a new tensor, version 0 like the old one
        assert_matches_f_linear(project(linear, x), linear, x)


@needs_onednn
def test_small_weights_keep_f_linear(monkeypatch):
    monkeypatch.undo()  # the library's threshold
    x = torch.randn(1, 1536)
    with torch.no_grad():
        assert not onednn_applies(nn.Linear(1536, 80), x)  # Mamba-1 130M's x_proj
        assert onednn_applies(nn.Linear(1536, 768), x)  # its out_proj


def test_not_under_a_process_group(monkeypatch):
    linear = nn.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad():
        monkeypatch.setattr(projection.dist, "is_available", lambda: True)
        monkeypatch.setattr(projection.dist, "is_initialized", lambda: True)
        assert not onednn_applies(linear, x)


def test_autograd_takes_nn_linear_with_gradients():
    linear = nn.Linear(16, 8)
    x = torch.randn(3, 16, requires_grad=True)
    assert not onednn_applies(linear, x)
    project(linear, x).sum().backward()
    assert not packed(linear)
    torch.testing.assert_close(x.grad, linear.weight.sum(0).expand(3, 16))


class Doubled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_other_modules_dtypes_and_hooks_keep_their_forward(monkeypatch):
    x = torch.randn(2, 16)
    with torch.no_grad():
        sub = Doubled(16, 4)
        torch.testing.assert_close(project(sub, x), 2 * F.linear(x, sub.weight, sub.bias))
        half = nn.Linear(16, 4).to(torch.bfloat16)
        assert not onednn_applies(half, x.to(torch.bfloat16))
        hooked = nn.Linear(16, 4)
        hooked.register_forward_hook(lambda module, args, out: out + 1)
        torch.testing.assert_close(project(hooked, x), F.linear(x, hooked.weight, hooked.bias) + 1)
        plain = nn.Linear(16, 4)
        monkeypatch.setenv("MAMBAKIT_CPU_ONEDNN", "0")
        assert not onednn_applies(plain, x)
        project(plain, x)
    assert not any(packed(m) for m in (sub, half, hooked, plain))


@needs_onednn
def test_a_module_that_ran_copies_and_saves():
    linear = nn.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = project(linear, x)
    assert packed(linear)
    twin = copy.deepcopy(linear)
    torch.save(linear, io.BytesIO())
    with torch.no_grad():
        torch.testing.assert_close(project(twin, x), expected)


@needs_onednn
def test_a_failing_reorder_falls_back_to_f_linear_for_good(monkeypatch):
    def broken(weight):
        raise RuntimeError("no kernels for this CPU")

    monkeypatch.setattr(projection, "_reorder", broken)
    monkeypatch.setattr(projection, "_ONEDNN", True)
    linear = nn.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad(), pytest.warns(UserWarning, match="could not reorder"):
        y = project(linear, x)
    torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias))
    assert not projection._ONEDNN and not onednn_applies(linear, x)
