"""Tests of the causal depthwise conv and its decode step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.conv1d import causal_conv1d, causal_conv1d_update
from tests.utils import assert_close, assert_raises_starting

WIDTHS = [2, 3, 4]
LENGTHS = [1, 2, 7]  # 1 and 2 are shorter than w - 1 for the wider filters


def make_inputs(seed, b=2, d=5, l=7, w=4, dtype=torch.float64, *, bias=False, initial_state=False):
    """Fresh random inputs (never zeros) as a dict of causal_conv1d keyword arguments."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    kw = dict(x=rand(b, d, l), weight=rand(d, w))
    if bias:
        kw["bias"] = rand(d)
    if initial_state:
        kw["initial_state"] = rand(b, d, w - 1)
    return kw


def random_seq_idx(seed, b, l, dtype=torch.int32):
    """Random packing per row: sequences of random lengths (some of length 1), ids increasing."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(b, l, generator=gen) < 0.35
    starts[:, 0] = False
    return starts.long().cumsum(dim=1).to(dtype)


def conv_loop(x, weight, bias=None, activation=None, initial_state=None, seq_idx=None):
    """The definition, one output and one tap at a time, in float64.

    With seq_idx, token t sees inputs from its own sequence only; the state positions (s < 0)
    count as part of the first sequence of the row.
    """
    x, weight = x.double(), weight.double()
    b, d, l = x.shape
    w = weight.shape[1]
    state = torch.zeros(b, d, w - 1, dtype=torch.float64) if initial_state is None else initial_state.double()
    y = torch.zeros(b, d, l, dtype=torch.float64)
    for i in range(b):
        start = 0  # first token of the sequence that token t belongs to
        for t in range(l):
            if seq_idx is not None and t > 0 and seq_idx[i, t] != seq_idx[i, t - 1]:
                start = t
            acc = torch.zeros(d, dtype=torch.float64) if bias is None else bias.double().clone()
            for k in range(w):
                s = t - (w - 1) + k
                if s >= 0 and s >= start:
                    acc = acc + weight[:, k] * x[i, :, s]
                elif s < 0 and start == 0:
                    acc = acc + weight[:, k] * state[i, :, s + w - 1]
            y[i, :, t] = F.silu(acc) if activation == "silu" else acc
    return y


def last_inputs(x, initial_state, w):
    """The last w - 1 entries of cat([initial_state or zeros, x], -1)."""
    b, d, _ = x.shape
    state = x.new_zeros(b, d, w - 1) if initial_state is None else initial_state.to(x.dtype)
    return torch.cat([state, x], dim=-1)[..., x.shape[-1]:]


# ----------------------------------------------------------------------------------------------
# Against the definition
# ----------------------------------------------------------------------------------------------

FEATURES = {
    # id: (make_inputs options, causal_conv1d options)
    "plain": ({}, {}),
    "bias": (dict(bias=True), {}),
    "silu": ({}, dict(activation="silu")),
    "bias_silu": (dict(bias=True), dict(activation="silu")),
    "initial_state": (dict(initial_state=True), {}),
    "everything": (dict(bias=True, initial_state=True), dict(activation="silu")),
}


@pytest.mark.parametrize("feature", list(FEATURES), ids=list(FEATURES))
@pytest.mark.parametrize("l", LENGTHS, ids=lambda l: f"l{l}")
@pytest.mark.parametrize("w", WIDTHS, ids=lambda w: f"w{w}")
def test_matches_loop(w, l, feature):
    make_opts, opts = FEATURES[feature]
    kw = make_inputs(100 * w + l, l=l, w=w, **make_opts)
    y, final = causal_conv1d(**kw, **opts, return_final_state=True)
    assert y.dtype == torch.float64 and final.dtype == torch.float64
    assert_close(y, conv_loop(**kw, **opts), 1e-12, "y")
    assert_close(final, last_inputs(kw["x"], kw.get("initial_state"), w), 0.0, "final_state")


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("l", LENGTHS, ids=lambda l: f"l{l}")
@pytest.mark.parametrize("w", WIDTHS, ids=lambda w: f"w{w}")
def test_matches_torch_conv1d(w, l, bias):
    """Conv1d(groups=d, padding=w - 1), truncated to the first l outputs."""
    kw = make_inputs(7 + w + 10 * l, l=l, w=w, bias=bias)
    d = kw["x"].shape[1]
    conv = torch.nn.Conv1d(d, d, w, groups=d, padding=w - 1, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(kw["weight"][:, None, :])
        if bias:
            conv.bias.copy_(kw["bias"])
        expected = conv(kw["x"])[..., :l]
    assert_close(causal_conv1d(**kw), expected, 1e-12, "y")


@pytest.mark.parametrize("l", LENGTHS, ids=lambda l: f"l{l}")
@pytest.mark.parametrize("w", WIDTHS, ids=lambda w: f"w{w}")
def test_final_state_is_last_inputs(w, l):
    kw = make_inputs(3 * w + l, l=l, w=w, initial_state=True)
    _, final = causal_conv1d(**kw, return_final_state=True)
    x, s0 = kw["x"], kw["initial_state"]
    if l >= w - 1:
        expected = x[..., l - (w - 1):]
    else:  # the oldest entries still come from the initial state
        expected = torch.cat([s0[..., l:], x], dim=-1)
    assert torch.equal(final, expected)


def test_default_initial_state_is_zeros():
    kw = make_inputs(11, l=2, w=4, bias=True)
    zeros = torch.zeros(2, 5, 3, dtype=torch.float64)
    y0, f0 = causal_conv1d(**kw, return_final_state=True)
    y1, f1 = causal_conv1d(**kw, initial_state=zeros, return_final_state=True)
    assert torch.equal(y0, y1) and torch.equal(f0, f1)
    assert torch.equal(f0[..., :1], torch.zeros(2, 5, 1, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Prefill + continuation, decode steps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5, 8], ids=lambda k: f"split{k}")
@pytest.mark.parametrize("w", WIDTHS, ids=lambda w: f"w{w}")
def test_prefill_then_continue(w, k):
    """causal_conv1d on [0, k) then on [k, l) from the returned state equals the full run."""
    kw = make_inputs(50 + w + k, l=9, w=w, bias=True, initial_state=True)
    x, opts = kw.pop("x"), dict(activation="silu")
    y_full, f_full = causal_conv1d(x, **kw, **opts, return_final_state=True)
    kw0 = dict(kw)
    s0 = kw0.pop("initial_state")
    y1, s1 = causal_conv1d(x[..., :k], **kw0, initial_state=s0, **opts, return_final_state=True)
    y2, s2 = causal_conv1d(x[..., k:], **kw0, initial_state=s1, **opts, return_final_state=True)
    assert_close(torch.cat([y1, y2], dim=-1), y_full, 1e-14, "y")
    assert torch.equal(s2, f_full)


@pytest.mark.parametrize("activation", [None, "silu"], ids=["identity", "silu"])
@pytest.mark.parametrize("w", WIDTHS, ids=lambda w: f"w{w}")
def test_update_steps_reproduce_full_run(w, activation):
    kw = make_inputs(70 + w, l=7, w=w, bias=True, initial_state=True)
    x, weight, bias, s0 = kw["x"], kw["weight"], kw["bias"], kw["initial_state"]
    y_full, f_full = causal_conv1d(**kw, activation=activation, return_final_state=True)

    state = s0.clone()
    ptr = state.data_ptr()
    for t in range(x.shape[-1]):
        y_t = causal_conv1d_update(x[..., t], state, weight, bias, activation=activation)
        assert y_t.shape == (2, 5) and y_t.dtype == torch.float64
        assert_close(y_t, y_full[..., t], 1e-14, f"y step {t}")
        assert torch.equal(state, last_inputs(x[..., : t + 1], s0, w)), f"state after step {t}"
    assert state.data_ptr() == ptr  # updated in place, not rebound
    assert torch.equal(state, f_full)


def test_update_state_keeps_its_dtype():
    """A bf16 cache stores the new input rounded to bf16; y follows x's dtype (float32)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, generator=gen)
    weight = torch.randn(6, 4, generator=gen)
    state = torch.randn(2, 6, 3, generator=gen).to(torch.bfloat16)
    before = state.clone()
    window = torch.cat([before.float(), x[..., None]], dim=-1)
    y = causal_conv1d_update(x, state, weight)
    assert y.dtype == torch.float32 and state.dtype == torch.bfloat16
    assert_close(y, (window * weight).sum(-1), 1e-6, "y")
    assert torch.equal(state[..., :2], before[..., 1:])
    assert torch.equal(state[..., 2], x.to(torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# Packed sequences
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("initial_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("w", WIDTHS, ids=lambda w: f"w{w}")
def test_seq_idx_equals_separate_runs(w, initial_state):
    l = 13
    kw = make_inputs(90 + w, b=3, l=l, w=w, bias=True, initial_state=initial_state)
    seq_idx = random_seq_idx(91 + w, 3, l)
    opts = dict(activation="silu")
    y, final = causal_conv1d(**kw, **opts, seq_idx=seq_idx, return_final_state=True)
    assert_close(y, conv_loop(**kw, **opts, seq_idx=seq_idx), 1e-12, "y vs loop")

    s0 = kw.get("initial_state")
    for i in range(3):
        ids = seq_idx[i].tolist()
        bounds = [0] + [t for t in range(1, l) if ids[t] != ids[t - 1]] + [l]
        for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            state = s0[i : i + 1] if (s0 is not None and j == 0) else None
            y_seg, f_seg = causal_conv1d(kw["x"][i : i + 1, :, lo:hi], kw["weight"], kw["bias"], **opts,
                                         initial_state=state, return_final_state=True)
            assert_close(y[i : i + 1, :, lo:hi], y_seg, 1e-13, f"row {i} sequence {j}")
        # The final state continues the last packed sequence: it equals that sequence's own.
        assert_close(final[i : i + 1], f_seg, 0.0, f"row {i} final state")


def test_seq_idx_reused_ids_and_int64():
    """Ids 0, 0, 1, 1, 0, 0 are three sequences; int64 ids give the same as int32."""
    kw = make_inputs(17, b=1, l=6, w=3)
    seq_idx = torch.tensor([[0, 0, 1, 1, 0, 0]])
    y = causal_conv1d(**kw, seq_idx=seq_idx)
    for lo in (0, 2, 4):
        assert_close(y[..., lo : lo + 2], causal_conv1d(kw["x"][..., lo : lo + 2], kw["weight"]), 1e-14)
    assert torch.equal(y, causal_conv1d(**kw, seq_idx=seq_idx.to(torch.int32)))


def test_seq_idx_constant_is_a_no_op():
    kw = make_inputs(19, l=7, w=4, bias=True, initial_state=True)
    seq_idx = torch.full((2, 7), 3, dtype=torch.int64)
    y0, f0 = causal_conv1d(**kw, return_final_state=True)
    y1, f1 = causal_conv1d(**kw, seq_idx=seq_idx, return_final_state=True)
    assert_close(y1, y0, 1e-14, "y")
    assert torch.equal(f1, f0)


# ----------------------------------------------------------------------------------------------
# Gradients and dtypes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "seq_idx"])
@pytest.mark.parametrize("w", [2, 4], ids=lambda w: f"w{w}")
def test_gradcheck(w, packed):
    kw = make_inputs(30 + w, b=2, d=3, l=5, w=w, bias=True, initial_state=True)
    names = ["x", "weight", "bias", "initial_state"]
    inputs = tuple(kw[n].clone().requires_grad_() for n in names)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 2]]) if packed else None

    def f(x, weight, bias, initial_state):
        y, final = causal_conv1d(x, weight, bias, activation="silu", initial_state=initial_state,
                                 return_final_state=True, seq_idx=seq_idx)
        return y, final

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_update():
    kw = make_inputs(40, b=2, d=3, l=1, w=4, bias=True, initial_state=True)
    inputs = (kw["x"][..., 0].clone().requires_grad_(), kw["initial_state"].clone().requires_grad_(),
              kw["weight"].clone().requires_grad_(), kw["bias"].clone().requires_grad_())

    def f(x, state, weight, bias):
        state = state.clone()  # the op writes into its state
        y = causal_conv1d_update(x, state, weight, bias, activation="silu")
        return y, state

    assert torch.autograd.gradcheck(f, inputs)


DTYPE_TOLS = {"fp32": (torch.float32, 1e-6), "fp16": (torch.float16, 2e-3), "bf16": (torch.bfloat16, 1e-2)}


@pytest.mark.parametrize("params_fp32", [False, True], ids=["params_same", "params_fp32"])
@pytest.mark.parametrize("dtype_id", list(DTYPE_TOLS), ids=list(DTYPE_TOLS))
def test_low_precision(dtype_id, params_fp32):
    dtype, tol = DTYPE_TOLS[dtype_id]
    kw = make_inputs(60, b=2, d=16, l=33, w=4, bias=True, initial_state=True)
    pdtype = torch.float32 if params_fp32 else dtype
    low = {k: v.to(pdtype if k in ("weight", "bias") else dtype) for k, v in kw.items()}
    y, final = causal_conv1d(**low, activation="silu", return_final_state=True)
    assert y.dtype == dtype and final.dtype == dtype
    # The reference sees the same rounded inputs: only the op's own rounding is measured.
    expected = conv_loop(**{k: v.double() for k, v in low.items()}, activation="silu")
    assert_close(y, expected, tol, "y")
    assert torch.equal(final, low["x"][..., -3:])

    state = low["initial_state"].clone()
    y_step = causal_conv1d_update(low["x"][..., 0], state, low["weight"], low["bias"], activation="silu")
    assert y_step.dtype == dtype
    assert_close(y_step, expected[..., 0], tol, "update")


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _good(**changes):
    kw = make_inputs(1, b=2, d=5, l=7, w=4, bias=True, initial_state=True)
    kw.update(changes)
    return kw


BAD_CONV = {
    # id: (keyword changes, error, message start)
    "x_list": (dict(x=[[1.0]]), TypeError, "x:"),
    "x_int": (dict(x=torch.ones(2, 5, 7, dtype=torch.int64)), TypeError, "x:"),
    "x_2d": (dict(x=torch.randn(5, 7)), ValueError, "x:"),
    "x_empty_length": (dict(x=torch.randn(2, 5, 0)), ValueError, "x:"),
    "weight_1d": (dict(weight=torch.randn(5)), ValueError, "weight:"),
    "weight_wrong_d": (dict(weight=torch.randn(4, 4)), ValueError, "weight:"),
    "weight_int": (dict(weight=torch.ones(5, 4, dtype=torch.int32)), TypeError, "weight:"),
    "bias_shape": (dict(bias=torch.randn(4)), ValueError, "bias:"),
    "activation_relu": (dict(activation="relu"), ValueError, "activation:"),
    "initial_state_width": (dict(initial_state=torch.randn(2, 5, 4)), ValueError, "initial_state:"),
    "initial_state_batch": (dict(initial_state=torch.randn(1, 5, 3)), ValueError, "initial_state:"),
    "return_final_state_int": (dict(return_final_state=1), TypeError, "return_final_state:"),
    "seq_idx_float": (dict(seq_idx=torch.zeros(2, 7)), TypeError, "seq_idx:"),
    "seq_idx_shape": (dict(seq_idx=torch.zeros(2, 6, dtype=torch.int64)), ValueError, "seq_idx:"),
    "device": (dict(bias=torch.randn(5, device="meta")), ValueError, "bias:"),
}


@pytest.mark.parametrize("case", list(BAD_CONV), ids=list(BAD_CONV))
def test_bad_inputs(case):
    changes, error, start = BAD_CONV[case]
    assert_raises_starting(lambda: causal_conv1d(**_good(**changes)), error, start)


BAD_UPDATE = {
    "x_3d": (dict(x=torch.randn(2, 5, 1)), ValueError, "x:"),
    "conv_state_width": (dict(conv_state=torch.randn(2, 5, 4)), ValueError, "conv_state:"),
    "conv_state_int": (dict(conv_state=torch.zeros(2, 5, 3, dtype=torch.int64)), TypeError, "conv_state:"),
    "weight_wrong_d": (dict(weight=torch.randn(6, 4)), ValueError, "weight:"),
    "bias_shape": (dict(bias=torch.randn(2, 5)), ValueError, "bias:"),
    "activation": (dict(activation="gelu"), ValueError, "activation:"),
}


@pytest.mark.parametrize("case", list(BAD_UPDATE), ids=list(BAD_UPDATE))
def test_bad_update_inputs_leave_state_untouched(case):
    changes, error, start = BAD_UPDATE[case]
    gen = torch.Generator().manual_seed(3)
    kw = dict(x=torch.randn(2, 5, generator=gen), conv_state=torch.randn(2, 5, 3, generator=gen),
              weight=torch.randn(5, 4, generator=gen), bias=torch.randn(5, generator=gen))
    kw.update(changes)
    before = kw["conv_state"].clone()
    assert_raises_starting(lambda: causal_conv1d_update(**kw), error, start)
    assert torch.equal(kw["conv_state"], before)
