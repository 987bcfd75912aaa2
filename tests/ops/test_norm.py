"""Tests of the norms: RMSNorm, LayerNorm, gated grouped RMSNorm, residual add + norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.norm import add_norm, gated_rms_norm, layer_norm, rms_norm
from tests.utils import assert_close, assert_raises_starting

D = 12


def rand(seed, *shape, dtype=torch.float64, scale=1.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)


# Direct formulas, float64, written out without the ops' helpers.


def rms_formula(x, weight, eps=1e-5):
    x, weight = x.double(), weight.double()
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * weight


def layer_formula(x, weight, bias=None, eps=1e-5):
    x, weight = x.double(), weight.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias.double()


def gated_formula(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    """One group at a time: the statistics of group i see channels [i gs, (i + 1) gs) only."""
    x, weight = x.double(), weight.double()
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    silu = None if z is None else z.double() * torch.sigmoid(z.double())
    if silu is not None and not norm_before_gate:
        x = x * silu
    parts = []
    for lo in range(0, d, gs):
        chunk = x[..., lo : lo + gs]
        parts.append(chunk / torch.sqrt((chunk * chunk).mean(dim=-1, keepdim=True) + eps))
    y = torch.cat(parts, dim=-1) * weight
    if silu is not None and norm_before_gate:
        y = y * silu
    return y


SHAPES = {"1d": (D,), "2d": (3, D), "3d": (2, 5, D), "odd_d": (4, 7)}


# ----------------------------------------------------------------------------------------------
# rms_norm, layer_norm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 1e-2], ids=["eps1e-5", "eps1e-2"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_rms_norm_matches_formula(shape, eps):
    shape = SHAPES[shape]
    x, weight = rand(1, *shape, scale=2.0, offset=0.3), rand(2, shape[-1])
    y = rms_norm(x, weight, eps=eps)
    assert y.dtype == torch.float64
    assert_close(y, rms_formula(x, weight, eps), 1e-14, "y")


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_layer_norm_matches_formula(shape, bias):
    shape = SHAPES[shape]
    x, weight = rand(3, *shape, scale=2.0, offset=0.7), rand(4, shape[-1])
    b = rand(5, shape[-1]) if bias else None
    y = layer_norm(x, weight, b, eps=1e-3)
    assert y.dtype == torch.float64
    assert_close(y, layer_formula(x, weight, b, eps=1e-3), 1e-13, "y")


DTYPE_TOLS = {"fp32": (torch.float32, 1e-6), "fp16": (torch.float16, 1e-3), "bf16": (torch.bfloat16, 8e-3)}


@pytest.mark.parametrize("weight_fp32", [False, True], ids=["weight_same", "weight_fp32"])
@pytest.mark.parametrize("dtype_id", list(DTYPE_TOLS), ids=list(DTYPE_TOLS))
def test_low_precision(dtype_id, weight_fp32):
    dtype, tol = DTYPE_TOLS[dtype_id]
    x = rand(6, 4, 9, 64, dtype=dtype, scale=3.0)
    weight = rand(7, 64, dtype=torch.float32 if weight_fp32 else dtype)
    bias, z = rand(8, 64, dtype=weight.dtype), rand(9, 4, 9, 64, dtype=dtype)
    cases = {
        "rms_norm": (rms_norm(x, weight), rms_formula(x, weight)),
        "layer_norm": (layer_norm(x, weight, bias), layer_formula(x, weight, bias)),
        "gated": (gated_rms_norm(x, weight, z, group_size=16),
                  gated_formula(x, weight, z, group_size=16)),
    }
    for name, (y, expected) in cases.items():
        assert y.dtype == dtype, name
        # Only the final rounding to the output dtype separates the op from the float64 formula.
        assert_close(y, expected, tol, name)


# ----------------------------------------------------------------------------------------------
# gated_rms_norm
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("group_size", [None, 4, 6, 12], ids=lambda g: f"group{g}")
def test_gated_rms_norm_matches_formula(group_size, norm_before_gate):
    x, z, weight = rand(10, 2, 5, D, offset=0.5), rand(11, 2, 5, D), rand(12, D)
    y = gated_rms_norm(x, weight, z, group_size=group_size, norm_before_gate=norm_before_gate)
    expected = gated_formula(x, weight, z, group_size=group_size, norm_before_gate=norm_before_gate)
    assert_close(y, expected, 1e-14, "y")


def test_gate_position_matters():
    x, z, weight = rand(13, 3, D), rand(14, 3, D), rand(15, D)
    a = gated_rms_norm(x, weight, z, group_size=4, norm_before_gate=False)
    b = gated_rms_norm(x, weight, z, group_size=4, norm_before_gate=True)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("group_size", [4, 6], ids=lambda g: f"group{g}")
def test_groups_are_independent(group_size):
    """Each group is an RMSNorm of its own channels; scaling one group leaves the others."""
    x, weight = rand(16, 3, D), rand(17, D)
    y = gated_rms_norm(x, weight, group_size=group_size)
    for lo in range(0, D, group_size):
        sl = slice(lo, lo + group_size)
        assert_close(y[..., sl], rms_norm(x[..., sl], weight[sl]), 1e-14, f"group at {lo}")
    scaled = x.clone()
    scaled[..., :group_size] *= 10.0
    y2 = gated_rms_norm(scaled, weight, group_size=group_size)
    assert_close(y2[..., group_size:], y[..., group_size:], 1e-14, "other groups")


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
def test_gated_without_z_is_rms_norm(norm_before_gate):
    x, weight = rand(18, 2, 3, D), rand(19, D)
    assert_close(gated_rms_norm(x, weight, norm_before_gate=norm_before_gate), rms_norm(x, weight), 1e-15)


# ----------------------------------------------------------------------------------------------
# add_norm
# ----------------------------------------------------------------------------------------------

ADD_CASES = {
    # id: (residual dtype or None, residual_in_fp32, weight dtype)
    "first_block_bf16_res": (None, False, torch.float32),
    "first_block_fp32_res": (None, True, torch.float32),
    "bf16_res": (torch.bfloat16, False, torch.float32),
    "fp32_res": (torch.float32, True, torch.float32),
    "fp32_res_bf16_weight": (torch.float32, True, torch.bfloat16),
    "bf16_res_bf16_weight": (torch.bfloat16, False, torch.bfloat16),
    "bf16_res_fp32_add": (torch.bfloat16, True, torch.float32),
}


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("case", list(ADD_CASES), ids=list(ADD_CASES))
def test_add_norm(case, kind):
    res_dtype, in_fp32, w_dtype = ADD_CASES[case]
    x = rand(20, 2, 7, 32, dtype=torch.bfloat16)
    residual = None if res_dtype is None else rand(21, 2, 7, 32, dtype=res_dtype, scale=3.0)
    weight = rand(22, 32, dtype=w_dtype)
    bias = rand(23, 32, dtype=w_dtype) if kind == "layer" else None
    normed, new_residual = add_norm(x, residual, weight, bias, eps=1e-5, kind=kind,
                                    residual_in_fp32=in_fp32)

    exact = x.double() if residual is None else x.double() + residual.double()
    if in_fp32:
        assert new_residual.dtype == torch.float32
        assert_close(new_residual, exact, 1e-7, "new_residual")  # one fp32 rounding at most
    else:
        assert new_residual.dtype == torch.bfloat16
        assert torch.equal(new_residual, exact.to(torch.bfloat16))  # one bf16 rounding
    # The norm sees the residual rounded to the weight's dtype (official Block) ...
    seen = new_residual.to(w_dtype)
    formula = rms_formula(seen, weight) if kind == "rms" else layer_formula(seen, weight, bias)
    assert normed.dtype == w_dtype
    # ... and its only error is its final rounding to the weight's dtype.
    assert_close(normed, formula, 1e-6 if w_dtype == torch.float32 else 8e-3, "normed")


def test_add_norm_chains_blocks():
    """Two blocks in a row: the second takes the first's residual, float32 throughout."""
    x1, x2 = rand(24, 3, 16, dtype=torch.bfloat16), rand(25, 3, 16, dtype=torch.bfloat16)
    weight = rand(26, 16, dtype=torch.float32)
    _, r1 = add_norm(x1, None, weight, residual_in_fp32=True)
    normed, r2 = add_norm(x2, r1, weight, residual_in_fp32=True)
    assert_close(r2, x1.double() + x2.double(), 1e-7, "residual")
    assert_close(normed, rms_formula(r2, weight), 1e-6, "normed")


def test_add_norm_float64_matches_formulas():
    x, residual, weight, bias = rand(27, 4, D), rand(28, 4, D), rand(29, D), rand(30, D)
    for in_fp32 in (False, True):
        normed, new_residual = add_norm(x, residual, weight, bias, kind="layer", residual_in_fp32=in_fp32)
        assert new_residual.dtype == torch.float64 and normed.dtype == torch.float64
        assert_close(new_residual, x + residual, 1e-15, "residual")
        assert_close(normed, layer_formula(x + residual, weight, bias), 1e-13, "normed")


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def test_gradcheck_rms_and_layer_norm():
    x, weight, bias = rand(31, 2, 3, 6), rand(32, 6), rand(33, 6)
    x, weight, bias = (t.clone().requires_grad_() for t in (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, eps=1e-3), (x, weight))
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w, b, eps=1e-3), (x, weight, bias))


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("group_size", [None, 4], ids=lambda g: f"group{g}")
def test_gradcheck_gated(group_size, norm_before_gate):
    x, z, weight = (rand(s, *shape).requires_grad_() for s, shape in ((34, (2, D)), (35, (2, D)), (36, (D,))))

    def f(x, z, weight):
        return gated_rms_norm(x, weight, z, eps=1e-3, group_size=group_size, norm_before_gate=norm_before_gate)

    assert torch.autograd.gradcheck(f, (x, z, weight))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_gradcheck_add_norm(kind):
    x, residual, weight, bias = (rand(s, *shape).requires_grad_()
                                 for s, shape in ((37, (2, 6)), (38, (2, 6)), (39, (6,)), (40, (6,))))

    def f(x, residual, weight, bias):
        return add_norm(x, residual, weight, bias if kind == "layer" else None, eps=1e-3, kind=kind)

    assert torch.autograd.gradcheck(f, (x, residual, weight, bias))


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------

X, W = rand(41, 2, D), rand(42, D)

BAD = {
    # id: (call, error, message start)
    "rms_x_list": (lambda: rms_norm([1.0], W), TypeError, "x:"),
    "rms_x_int": (lambda: rms_norm(torch.ones(2, D, dtype=torch.int64), W), TypeError, "x:"),
    "rms_x_scalar": (lambda: rms_norm(torch.tensor(1.0), W), ValueError, "x:"),
    "rms_weight_shape": (lambda: rms_norm(X, rand(0, D + 1)), ValueError, "weight:"),
    "rms_weight_2d": (lambda: rms_norm(X, rand(0, 1, D)), ValueError, "weight:"),
    "rms_eps_negative": (lambda: rms_norm(X, W, eps=-1.0), ValueError, "eps:"),
    "rms_eps_string": (lambda: rms_norm(X, W, eps="1e-5"), TypeError, "eps:"),
    "rms_device": (lambda: rms_norm(X, torch.ones(D, device="meta")), ValueError, "weight:"),
    "layer_bias_shape": (lambda: layer_norm(X, W, rand(0, 3)), ValueError, "bias:"),
    "gated_group_not_dividing": (lambda: gated_rms_norm(X, W, group_size=5), ValueError, "group_size:"),
    "gated_group_zero": (lambda: gated_rms_norm(X, W, group_size=0), ValueError, "group_size:"),
    "gated_z_shape": (lambda: gated_rms_norm(X, W, rand(0, 3, D)), ValueError, "z:"),
    "gated_z_int": (lambda: gated_rms_norm(X, W, torch.ones(2, D, dtype=torch.int32)), TypeError, "z:"),
    "gated_flag_not_bool": (lambda: gated_rms_norm(X, W, norm_before_gate=1), TypeError, "norm_before_gate:"),
    "add_wrong_kind": (lambda: add_norm(X, None, W, kind="batch"), ValueError, "kind:"),
    "add_residual_shape": (lambda: add_norm(X, rand(0, 3, D), W), ValueError, "residual:"),
    "add_bias_with_rms": (lambda: add_norm(X, None, W, W, kind="rms"), ValueError, "bias:"),
    "add_weight_shape": (lambda: add_norm(X, X, rand(0, 6)), ValueError, "weight:"),
    "add_flag_not_bool": (lambda: add_norm(X, X, W, residual_in_fp32="yes"), TypeError, "residual_in_fp32:"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs(case):
    call, error, start = BAD[case]
    assert_raises_starting(call, error, start)
