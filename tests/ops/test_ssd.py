"""Tests of the Mamba-2 SSD scan (MATH.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.ssd import ssd
from tests.utils import assert_close, relative_error


def make_inputs(seed, b=2, l=13, h=4, p=3, g=2, n=5, dtype=torch.float64, *, D=None, z=False,
                dt_bias=False, initial_states=False, seq_idx=False, raw_dt=False):
    """Fresh random inputs; D is None, "h" or "hp". dt is a raw pre-softplus value when raw_dt
    (may be negative), else a positive step in (0.05, 0.55)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = rand(b, l, h) if raw_dt else 0.05 + 0.5 * torch.rand(b, l, h, generator=gen, dtype=torch.float64)
    kw = dict(
        x=rand(b, l, h, p), dt=dt,
        A=-(0.3 + 1.5 * torch.rand(h, generator=gen, dtype=torch.float64)),
        B=rand(b, l, g, n), C=rand(b, l, g, n),
    )
    if D == "h":
        kw["D"] = rand(h)
    elif D == "hp":
        kw["D"] = rand(h, p)
    if z:
        kw["z"] = rand(b, l, h, p)
    if dt_bias:
        kw["dt_bias"] = 0.5 * rand(h)
    if initial_states:
        kw["initial_states"] = rand(b, h, p, n)
    if seq_idx:
        # Random packing per row: a few sequences of random lengths, ids increasing.
        starts = torch.rand(b, l, generator=gen) < 0.25
        starts[:, 0] = False
        kw["seq_idx"] = starts.long().cumsum(dim=1).to(torch.int32)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw.items()}


def call(kw, **options):
    """ssd() on an input dict, positional args by name."""
    kw = dict(kw)
    return ssd(kw.pop("x"), kw.pop("dt"), kw.pop("A"), kw.pop("B"), kw.pop("C"), **kw, **options)


# ----------------------------------------------------------------------------------------------
# The algorithms agree
# ----------------------------------------------------------------------------------------------

FEATURES = {
    # id: (make_inputs options, ssd options)
    "plain_g1": (dict(g=1), {}),
    "groups_g2": (dict(g=2), {}),
    "groups_g4": (dict(g=4), {}),
    "D_h": (dict(D="h"), {}),
    "D_hp": (dict(D="hp"), {}),
    "z": (dict(z=True, D="h"), {}),
    "dt_bias_softplus": (dict(dt_bias=True, raw_dt=True), dict(dt_softplus=True)),
    "dt_limit": (dict(dt_bias=True, raw_dt=True), dict(dt_softplus=True, dt_limit=(0.2, 0.9))),
    "initial_states": (dict(initial_states=True), {}),
    "seq_idx": (dict(seq_idx=True), {}),
    "seq_idx_initial_states": (dict(seq_idx=True, initial_states=True), {}),
    "everything": (
        dict(g=2, D="hp", z=True, dt_bias=True, raw_dt=True, initial_states=True, seq_idx=True),
        dict(dt_softplus=True, dt_limit=(0.1, 1.2)),
    ),
}


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic"])
@pytest.mark.parametrize("l", [1, 7, 13, 16], ids=lambda l: f"l{l}")
@pytest.mark.parametrize("feature", list(FEATURES), ids=list(FEATURES))
def test_matches_recurrent_float64(feature, l, algorithm):
    make, options = FEATURES[feature]
    kw = make_inputs(seed=l * 100 + len(feature), l=l, **make)
    y_ref, s_ref = call(kw, algorithm="recurrent", chunk_size=4, return_final_states=True, **options)
    y, s = call(kw, algorithm=algorithm, chunk_size=4, return_final_states=True, **options)
    assert y.dtype == s.dtype == torch.float64
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(s, s_ref, 1e-10, "final_states")


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic"])
def test_default_chunk_size_long_sequence(algorithm):
    """l = 300 > the default chunk 256 (one full chunk plus a partial one)."""
    kw = make_inputs(seed=7, b=1, l=300, h=2, p=2, g=1, n=3, initial_states=True, D="h")
    y_ref, s_ref = call(kw, algorithm="recurrent", return_final_states=True)
    y, s = call(kw, algorithm=algorithm, return_final_states=True)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(s, s_ref, 1e-10, "final_states")


# ----------------------------------------------------------------------------------------------
# An independent check written out in scalars
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic", "recurrent"])
def test_hand_written_tiny_case(algorithm):
    """b = 1, l = 5, h = 2 heads sharing one group, p = 2, n = 3; every option on; a reset at
    t = 3. The expected values come from a scalar loop over the definition in MATH.md."""
    l, h, p, n = 5, 2, 2, 3
    kw = make_inputs(seed=11, b=1, l=l, h=h, p=p, g=1, n=n, D="h", z=True, dt_bias=True,
                     raw_dt=True, initial_states=True)
    seq_idx = torch.tensor([[4, 4, 4, 9, 9]])
    lo, hi = 0.1, 1.0
    x, dt, A, B, C = kw["x"][0], kw["dt"][0], kw["A"], kw["B"][0, :, 0], kw["C"][0, :, 0]
    D, z, bias, S0 = kw["D"], kw["z"][0], kw["dt_bias"], kw["initial_states"][0]

    expected = torch.zeros(l, h, p, dtype=torch.float64)
    final = torch.zeros(h, p, n, dtype=torch.float64)
    for j in range(h):
        state = [[S0[j, i, m].item() for m in range(n)] for i in range(p)]
        for t in range(l):
            step = math.log1p(math.exp(dt[t, j].item() + bias[j].item()))
            step = min(max(step, lo), hi)
            decay = 0.0 if t == 3 else math.exp(step * A[j].item())
            for i in range(p):
                for m in range(n):
                    state[i][m] = decay * state[i][m] + step * x[t, j, i].item() * B[t, m].item()
                out = sum(state[i][m] * C[t, m].item() for m in range(n)) + D[j].item() * x[t, j, i].item()
                zz = z[t, j, i].item()
                expected[t, j, i] = out * zz / (1.0 + math.exp(-zz))
        final[j] = torch.tensor(state, dtype=torch.float64)

    y, s = call(kw, chunk_size=2, dt_softplus=True, dt_limit=(lo, hi), seq_idx=seq_idx,
                return_final_states=True, algorithm=algorithm)
    assert_close(y[0], expected, 1e-12, "y")
    assert_close(s[0], final, 1e-12, "final_states")


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic", "recurrent"])
def test_group_mapping(algorithm):
    """h = 6 heads over g = 3 groups: head j reads group j // 2, i.e. the same as giving every
    head its own copy of its group's B and C (g = h)."""
    kw = make_inputs(seed=9, h=6, g=3, D="h")
    per_head = dict(kw, B=kw["B"][:, :, [0, 0, 1, 1, 2, 2]], C=kw["C"][:, :, [0, 0, 1, 1, 2, 2]])
    y, s = call(kw, chunk_size=4, return_final_states=True, algorithm=algorithm)
    y_ref, s_ref = call(per_head, chunk_size=4, return_final_states=True, algorithm="recurrent")
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(s, s_ref, 1e-10, "final_states")


@pytest.mark.parametrize("D_kind", ["h", "hp"])
def test_skip_and_gate(D_kind):
    """y = (ssm(x) + D x) * silu(z), with D broadcast per head (h,) or per channel (h, p)."""
    kw = make_inputs(seed=13, D=D_kind, z=True)
    bare = {k: v for k, v in kw.items() if k not in ("D", "z")}
    D = kw["D"][:, None] if D_kind == "h" else kw["D"]
    expected = (call(bare, chunk_size=4) + D * kw["x"]) * kw["z"] * torch.sigmoid(kw["z"])
    assert_close(call(kw, chunk_size=4), expected, 1e-12, "y")


def test_dt_processing_order():
    """bias, then softplus, then clamp, equals passing the processed dt directly."""
    kw = make_inputs(seed=3, raw_dt=True, dt_bias=True)
    y = call(kw, dt_softplus=True, dt_limit=(0.3, 0.8), chunk_size=4)
    plain = dict(kw)
    plain["dt"] = F.softplus(kw["dt"] + kw.pop("dt_bias")).clamp(0.3, 0.8)
    del plain["dt_bias"]
    assert_close(y, call(plain, chunk_size=4), 1e-12, "y")


def test_default_dt_limit_does_not_clamp():
    """Like the official reference paths, the default (0, inf) leaves a negative dt alone."""
    kw = make_inputs(seed=5, l=6, raw_dt=True)
    assert (kw["dt"] < 0).any()
    y = call(kw, chunk_size=4)
    y_rec = call(kw, algorithm="recurrent")
    clamped = dict(kw, dt=kw["dt"].clamp(min=0.0))
    assert_close(y, y_rec, 1e-10, "y")
    assert relative_error(y, call(clamped, chunk_size=4)) > 1e-3


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

GRAD_NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]


GRAD_CASES = {"chunked_D_h": ("chunked", "h"), "chunked_D_hp": ("chunked", "hp"),
              "quadratic_D_hp": ("quadratic", "hp")}


@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
def test_gradcheck_every_input(case):
    """Gradients of y and of the final states w.r.t. every floating input, with a reset at a
    chunk boundary (t = 4) and a partial last chunk."""
    algorithm, D_kind = GRAD_CASES[case]
    kw = make_inputs(seed=21, b=1, l=6, h=4, p=2, g=2, n=3, D=D_kind, z=True, dt_bias=True,
                     raw_dt=True, initial_states=True)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1]])
    tensors = tuple(kw[k].clone().requires_grad_() for k in GRAD_NAMES)

    def f(*args):
        named = dict(zip(GRAD_NAMES, args))
        y, s = call(named, chunk_size=4, dt_softplus=True, dt_limit=(0.05, 5.0), seq_idx=seq_idx,
                    return_final_states=True, algorithm=algorithm)
        return y, s

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_finite_with_strong_decay():
    """Decays that underflow to zero (dt A ~ -60 per step) give finite gradients: no exp of a
    large positive number anywhere, forward or backward."""
    kw = make_inputs(seed=4, b=1, l=40, h=2, p=2, g=1, n=3, initial_states=True)
    kw["dt"] = (kw["dt"] * 100).requires_grad_()
    kw["A"] = kw["A"].detach().requires_grad_()
    y, s = call(kw, chunk_size=16, return_final_states=True)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert torch.isfinite(kw["dt"].grad).all() and torch.isfinite(kw["A"].grad).all()


# ----------------------------------------------------------------------------------------------
# State passing and packing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic", "recurrent"])
@pytest.mark.parametrize("split", [1, 6, 9], ids=lambda k: f"split{k}")
def test_state_passing(split, algorithm):
    """[0, k) then [k, l) with the carried state equals one run; chunk 4, k off the boundaries."""
    kw = make_inputs(seed=30 + split, l=15, D="h", z=True, initial_states=True)
    y_full, s_full = call(kw, chunk_size=4, return_final_states=True, algorithm=algorithm)
    first = {k: (v[:, :split] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    second = {k: (v[:, split:] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    y1, s1 = call(first, chunk_size=4, return_final_states=True, algorithm=algorithm)
    second["initial_states"] = s1
    y2, s2 = call(second, chunk_size=4, return_final_states=True, algorithm=algorithm)
    assert_close(torch.cat([y1, y2], dim=1), y_full, 1e-10, "y")
    assert_close(s2, s_full, 1e-10, "final_states")


PACKINGS = {
    # id: (ids of row 0, ids of row 1); lengths 3/6/4 and 1/1/11 cross chunk boundaries (chunk 4)
    "three_sequences": ([0] * 3 + [1] * 6 + [2] * 4, [0] * 1 + [1] * 1 + [2] * 11),
    "single_tokens": (list(range(13)), [0] * 12 + [1]),
    "ids_not_increasing": ([7] * 5 + [2] * 2 + [7] * 6, [3] * 4 + [1] * 4 + [3] * 5),
}


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic"])
@pytest.mark.parametrize("with_initial", [False, True], ids=["zero_init", "initial_states"])
@pytest.mark.parametrize("packing", list(PACKINGS), ids=list(PACKINGS))
def test_seq_idx_matches_separate_runs(packing, with_initial, algorithm):
    """Packed rows equal each sequence run on its own (initial_states only for the first one)."""
    kw = make_inputs(seed=41, l=13, D="hp", z=True, initial_states=with_initial)
    seq_idx = torch.tensor(PACKINGS[packing], dtype=torch.int64)
    y, s = call(kw, seq_idx=seq_idx, chunk_size=4, return_final_states=True, algorithm=algorithm)
    per_token = ("x", "dt", "B", "C", "z")
    for row in range(2):
        ids = seq_idx[row].tolist()
        starts = [0] + [t for t in range(1, 13) if ids[t] != ids[t - 1]]
        bounds = list(zip(starts, starts[1:] + [13]))
        for i, (t0, t1) in enumerate(bounds):
            part = {k: (v[row:row + 1, t0:t1] if k in per_token else v) for k, v in kw.items()}
            if with_initial:
                part["initial_states"] = kw["initial_states"][row:row + 1] if i == 0 else None
            y_part, s_part = call(part, return_final_states=True, algorithm="recurrent")
            assert_close(y[row:row + 1, t0:t1], y_part, 1e-10, f"y row {row} [{t0}, {t1})")
        assert_close(s[row:row + 1], s_part, 1e-10, f"final_states row {row}")


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------

DTYPE_CASES = {
    # id: (activation dtype, parameter dtype, tolerance)
    "bf16": (torch.bfloat16, torch.bfloat16, 1e-2),
    "fp16": (torch.float16, torch.float16, 2e-3),
    "fp32": (torch.float32, torch.float32, 1e-5),
    "bf16_fp32_params": (torch.bfloat16, torch.float32, 1e-2),
}


@pytest.mark.parametrize("algorithm", ["chunked", "quadratic"])
@pytest.mark.parametrize("case", list(DTYPE_CASES), ids=list(DTYPE_CASES))
def test_low_precision_dtypes(case, algorithm):
    act, param, tol = DTYPE_CASES[case]
    kw = make_inputs(seed=51, b=2, l=37, h=4, p=8, g=2, n=16, D="h", z=True, dt_bias=True,
                     raw_dt=True, initial_states=True)
    params = ("A", "D", "dt_bias", "initial_states")
    low = {k: v.to(param if k in params else act) for k, v in kw.items()}
    # The float64 truth from the same (rounded) inputs: only the computation is compared.
    exact = {k: v.double() for k, v in low.items()}
    options = dict(chunk_size=16, dt_softplus=True, return_final_states=True)
    y, s = call(low, algorithm=algorithm, **options)
    y_ref, s_ref = call(exact, algorithm="recurrent", **options)
    assert y.dtype == act and s.dtype == torch.float32
    assert_close(y, y_ref, tol, "y")
    assert_close(s, s_ref, max(tol, 1e-5), "final_states")


def test_return_conventions():
    kw = make_inputs(seed=61, dtype=torch.float32)
    y = call(kw)
    assert isinstance(y, torch.Tensor) and y.shape == kw["x"].shape and y.dtype == torch.float32
    y2, s = call(kw, return_final_states=True)
    assert s.shape == (2, 4, 3, 5) and s.dtype == torch.float32
    assert torch.equal(y, y2)


# ----------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------


def _bad(mutate):
    def build():
        kw = make_inputs(seed=71, dtype=torch.float32, D="h")
        kw["chunk_size"] = 4
        mutate(kw)
        return kw
    return build


BAD_INPUTS = {
    # id: (mutation, error, match)
    "x_not_tensor": (lambda kw: kw.update(x=kw["x"].tolist()), TypeError, "x"),
    "x_int": (lambda kw: kw.update(x=kw["x"].long()), TypeError, "x"),
    "x_3d": (lambda kw: kw.update(x=kw["x"][0]), ValueError, "x"),
    "x_empty_length": (lambda kw: kw.update(x=kw["x"][:, :0]), ValueError, "x"),
    "dt_dtype_differs": (lambda kw: kw.update(dt=kw["dt"].double()), TypeError, "dt"),
    "dt_shape": (lambda kw: kw.update(dt=kw["dt"][:, :-1]), ValueError, "dt"),
    "A_shape": (lambda kw: kw.update(A=kw["A"][:-1]), ValueError, "A"),
    "A_complex": (lambda kw: kw.update(A=kw["A"].to(torch.complex64)), TypeError, "A"),
    "B_groups_not_dividing": (lambda kw: kw.update(B=kw["B"][:, :, :1].expand(-1, -1, 3, -1),
                                                   C=kw["C"][:, :, :1].expand(-1, -1, 3, -1)),
                              ValueError, "B"),
    "C_shape": (lambda kw: kw.update(C=kw["C"][..., :-1]), ValueError, "C"),
    "B_dtype": (lambda kw: kw.update(B=kw["B"].half()), TypeError, "B"),
    "D_shape": (lambda kw: kw.update(D=torch.ones(4, 2)), ValueError, "D"),
    "z_shape": (lambda kw: kw.update(z=torch.ones(2, 13, 4, 2)), ValueError, "z"),
    "dt_bias_shape": (lambda kw: kw.update(dt_bias=torch.ones(3)), ValueError, "dt_bias"),
    "initial_states_shape": (lambda kw: kw.update(initial_states=torch.ones(2, 4, 3, 4)),
                             ValueError, "initial_states"),
    "seq_idx_float": (lambda kw: kw.update(seq_idx=torch.zeros(2, 13)), TypeError, "seq_idx"),
    "seq_idx_shape": (lambda kw: kw.update(seq_idx=torch.zeros(2, 12, dtype=torch.long)),
                      ValueError, "seq_idx"),
    "dt_limit_reversed": (lambda kw: kw.update(dt_limit=(1.0, 0.5)), ValueError, "dt_limit"),
    "dt_limit_not_pair": (lambda kw: kw.update(dt_limit=0.5), ValueError, "dt_limit"),
    "dt_limit_three": (lambda kw: kw.update(dt_limit=(0.0, 0.5, 1.0)), ValueError, "dt_limit"),
    "chunk_size_zero": (lambda kw: kw.update(chunk_size=0), ValueError, "chunk_size"),
    "chunk_size_float": (lambda kw: kw.update(chunk_size=4.0), ValueError, "chunk_size"),
    "algorithm_unknown": (lambda kw: kw.update(algorithm="fast"), ValueError, "algorithm"),
    "dt_softplus_not_bool": (lambda kw: kw.update(dt_softplus="yes"), TypeError, "dt_softplus"),
    "device_differs": (lambda kw: kw.update(A=kw["A"].to("meta")), ValueError, "A"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_inputs_raise(case):
    mutate, error, name = BAD_INPUTS[case]
    kw = _bad(mutate)()
    with pytest.raises(error, match=rf"^{name}:"):
        call(kw)
