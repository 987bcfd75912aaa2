import cmath
import math

import pytest
import torch

from mambakit.ops.selective_scan import reference, selective_scan
from tests.utils import assert_close, relative_error

ALGORITHMS = ["chunked", "recurrent"]


def make_inputs(seed, *, complex_a=False, b_kind="var", c_kind="var", b=2, d=6, n=4, l=7,
                dtype=torch.float64, param_dtype=None, D=True, z=True, delta_bias=True,
                delta_softplus=True, initial_state=True):
    """Random, never-zero selective_scan keyword arguments.

    ``*_kind``: "const" (d, n), "var" (b, n, l), "grpG" (b, G, n, l); complex A makes the
    variable/grouped forms interleaved real (.., 2l) and the constant form complex."""
    g = torch.Generator().manual_seed(seed)
    param_dtype = param_dtype or dtype
    cplx = torch.complex128 if param_dtype == torch.float64 else torch.complex64

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt)

    def projection(kind):
        if kind == "const":
            x = randn(d, n, dt=torch.float64)
            return torch.complex(x, randn(d, n, dt=torch.float64)).to(cplx) if complex_a else x.to(param_dtype)
        length = 2 * l if complex_a else l
        if kind == "var":
            return randn(b, n, length)
        return randn(b, int(kind[3:]), n, length)

    # Decays in (0, 1): negative real part, and moderate step sizes (Mamba's regime).
    A_real = -(0.2 + torch.rand(d, n, generator=g, dtype=torch.float64))
    A = torch.complex(A_real, randn(d, n, dt=torch.float64)).to(cplx) if complex_a else A_real.to(param_dtype)
    delta = (0.05 + 0.5 * torch.rand(b, d, l, generator=g, dtype=torch.float64)).to(dtype)
    kwargs = dict(u=randn(b, d, l), delta=delta, A=A, B=projection(b_kind), C=projection(c_kind),
                  delta_softplus=delta_softplus)
    if D:
        kwargs["D"] = randn(d, dt=param_dtype)
    if z:
        kwargs["z"] = randn(b, d, l)
    if delta_bias:
        kwargs["delta_bias"] = (0.3 * randn(d, dt=torch.float64) - 1.0).to(param_dtype)
    if initial_state:
        h0 = randn(b, d, n, dt=torch.float64)
        if complex_a:
            kwargs["initial_state"] = torch.complex(h0, randn(b, d, n, dt=torch.float64)).to(cplx)
        else:
            kwargs["initial_state"] = h0.to(param_dtype)
    return kwargs


def explicit_loop(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """MATH.md section 2 one Python scalar at a time (independent of the module)."""
    bsz, d, l = u.shape
    n = A.shape[1]
    complex_a = A.is_complex()

    def entry(X, i, c, k, t):
        if X.dim() == 2:
            return X[c, k].item()
        row = X[i, k] if X.dim() == 3 else X[i, c // (d // X.shape[1]), k]
        return complex(row[2 * t].item(), row[2 * t + 1].item()) if complex_a else row[t].item()

    y = torch.empty(bsz, d, l, dtype=torch.float64)
    h_last = torch.empty(bsz, d, n, dtype=A.dtype)
    for i in range(bsz):
        for c in range(d):
            h = [0.0 if initial_state is None else initial_state[i, c, k].item() for k in range(n)]
            for t in range(l):
                step = delta[i, c, t].item() + (0.0 if delta_bias is None else delta_bias[c].item())
                if delta_softplus:
                    step = math.log1p(math.exp(step))
                acc = 0.0
                for k in range(n):
                    h[k] = cmath.exp(step * A[c, k].item()) * h[k] + step * entry(B, i, c, k, t) * u[i, c, t].item()
                    acc += entry(C, i, c, k, t) * h[k]
                out = 2 * acc.real if complex_a else acc.real
                if D is not None:
                    out += D[c].item() * u[i, c, t].item()
                if z is not None:
                    zt = z[i, c, t].item()
                    out *= zt / (1 + math.exp(-zt))
                y[i, c, t] = out
            for k in range(n):
                h_last[i, c, k] = h[k] if complex_a else h[k].real
    return y, h_last


# ---------------------------------------------------------------------------------------------
# Independent checks


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hand_computed_real(algorithm):
    # d = n = 1, decay exp(ln2 * -1) = 1/2, B = 2, C = 3, D = 1/2, u = [1, 2, 3]:
    # h = [2 ln2, ln2 + 4 ln2, 2.5 ln2 + 6 ln2], y = 3 h + u / 2.
    ln2 = math.log(2.0)
    u = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.float64)
    delta = torch.full((1, 1, 3), ln2, dtype=torch.float64)
    A = torch.tensor([[-1.0]], dtype=torch.float64)
    B = torch.tensor([[2.0]], dtype=torch.float64)
    C = torch.tensor([[3.0]], dtype=torch.float64)
    y, h = selective_scan(u, delta, A, B, C, D=torch.tensor([0.5], dtype=torch.float64),
                          return_final_state=True, algorithm=algorithm)
    expected = torch.tensor([[[6 * ln2 + 0.5, 15 * ln2 + 1.0, 25.5 * ln2 + 1.5]]], dtype=torch.float64)
    assert torch.allclose(y, expected, rtol=0, atol=1e-13)
    assert torch.allclose(h, torch.tensor([[[8.5 * ln2]]], dtype=torch.float64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hand_computed_complex_interleaved(algorithm):
    # Decay exp(1 * (-ln2 + i pi/2)) = i/2. B interleaved [1, 3, 0, 2] -> B_0 = 1 + 3i, B_1 = 2i
    # (a halves layout would give B_0 = 1, B_1 = 3 + 2i). u = 1, C = 1 - i (time-invariant):
    # h_0 = 1 + 3i, h_1 = (i/2)(1 + 3i) + 2i = -1.5 + 2.5i
    # y = 2 Re(C h) = [2 Re(4 + 2i), 2 Re(1 + 4i)] = [8, 2] (with conj(C): [-4, -8]).
    u = torch.ones(1, 1, 2, dtype=torch.float64)
    delta = torch.ones(1, 1, 2, dtype=torch.float64)
    A = torch.tensor([[complex(-math.log(2.0), math.pi / 2)]], dtype=torch.complex128)
    B = torch.tensor([[[1.0, 3.0, 0.0, 2.0]]], dtype=torch.float64)
    C = torch.tensor([[1 - 1j]], dtype=torch.complex128)
    y, h = selective_scan(u, delta, A, B, C, return_final_state=True, algorithm=algorithm)
    assert torch.allclose(y, torch.tensor([[[8.0, 2.0]]], dtype=torch.float64), rtol=0, atol=1e-13)
    assert h.dtype == torch.complex128
    assert torch.allclose(h, torch.tensor([[[-1.5 + 2.5j]]], dtype=torch.complex128), rtol=0, atol=1e-13)


LOOP_CASES = [
    pytest.param(False, "grp2", "var", id="real-Bgrp2-Cvar"),
    pytest.param(False, "const", "grp4", id="real-Bconst-Cgrp4"),
    pytest.param(True, "var", "grp2", id="complex-Bvar-Cgrp2"),
    pytest.param(True, "grp4", "const", id="complex-Bgrp4-Cconst"),
]


@pytest.mark.parametrize("complex_a,b_kind,c_kind", LOOP_CASES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matches_explicit_scalar_loop(complex_a, b_kind, c_kind, algorithm):
    kw = make_inputs(11, complex_a=complex_a, b_kind=b_kind, c_kind=c_kind, b=2, d=4, n=3, l=5)
    y, h = selective_scan(**kw, return_final_state=True, algorithm=algorithm)
    y_ref, h_ref = explicit_loop(**kw)
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(h, h_ref, 1e-12, "final state")


# ---------------------------------------------------------------------------------------------
# chunked == recurrent

EQUIV_CASES = [
    # complex_a, B, C, l, options
    pytest.param(False, "var", "var", 1, {}, id="real-var-var-l1"),
    pytest.param(False, "var", "var", 7, {}, id="real-var-var-l7"),
    pytest.param(False, "const", "var", 33, dict(D=False, z=False), id="real-const-var-l33-noD-noz"),
    pytest.param(False, "grp3", "const", 33, dict(delta_bias=False, delta_softplus=False),
                 id="real-grp3-const-l33-plain-delta"),
    pytest.param(False, "grp2", "grp3", 130, dict(initial_state=False), id="real-grp2-grp3-l130-no-h0"),
    pytest.param(False, "grp2", "grp3", 33, dict(small_blocks=True), id="real-grp2-grp3-l33-small-blocks"),
    pytest.param(True, "var", "var", 1, {}, id="complex-var-var-l1"),
    pytest.param(True, "const", "const", 7, dict(z=False), id="complex-const-const-l7-noz"),
    pytest.param(True, "var", "grp2", 33, dict(D=False, delta_softplus=False), id="complex-var-grp2-l33"),
    pytest.param(True, "grp3", "var", 130, dict(initial_state=False, delta_bias=False), id="complex-grp3-var-l130"),
    pytest.param(True, "grp6", "const", 33, dict(small_blocks=True), id="complex-grp6-const-l33-small-blocks"),
]


@pytest.fixture(params=["time-major", "parallel"])
def chunked_layout(request, monkeypatch):
    """The chunked algorithm's two ways: short sequences (all of these) scan time-major blocks
    token by token; "parallel" forces the (b, k, n, l) blocks and the parallel chunked scan that
    sequences of _PARALLEL_SCAN_LENGTH tokens and more take."""
    if request.param == "parallel":
        monkeypatch.setattr(reference, "_PARALLEL_SCAN_LENGTH", 0)
    return request.param


@pytest.mark.parametrize("complex_a,b_kind,c_kind,l,options", EQUIV_CASES)
def test_chunked_matches_recurrent(complex_a, b_kind, c_kind, l, options, chunked_layout, monkeypatch):
    options = dict(options)
    if options.pop("small_blocks", False):
        # Blocks of 2 channels: with 2 or 3 groups over d = 6 some blocks end at a group boundary.
        monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 2 * 2 * 4 * l)
        monkeypatch.setattr(reference, "_MIN_TIME_MAJOR_ROW", 1)
    kw = make_inputs(l, complex_a=complex_a, b_kind=b_kind, c_kind=c_kind, l=l, **options)
    y, h = selective_scan(**kw, return_final_state=True, algorithm="chunked")
    y_ref, h_ref = selective_scan(**kw, return_final_state=True, algorithm="recurrent")
    assert y.dtype == torch.float64 and h.dtype == (torch.complex128 if complex_a else torch.float64)
    assert_close(y, y_ref, 1e-10, "y")
    assert_close(h, h_ref, 1e-10, "final state")


def test_return_final_state_flag_changes_only_the_return():
    kw = make_inputs(5)
    y = selective_scan(**kw)
    y2, h = selective_scan(**kw, return_final_state=True)
    assert isinstance(y, torch.Tensor) and torch.equal(y, y2) and h.shape == (2, 6, 4)


# ---------------------------------------------------------------------------------------------
# Gradients

GRAD_CASES = [
    pytest.param(False, "grp2", "var", id="real-Bgrp2-Cvar"),
    pytest.param(False, "const", "grp2", id="real-Bconst-Cgrp2"),
    pytest.param(True, "const", "var", id="complex-Bconst-Cvar"),
    pytest.param(True, "grp2", "const", id="complex-Bgrp2-Cconst"),
]
GRAD_INPUTS = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


@pytest.mark.parametrize("complex_a,b_kind,c_kind", GRAD_CASES)
@pytest.mark.parametrize("algorithm,parallel", [("chunked", False), ("chunked", True), ("recurrent", False)],
                         ids=["chunked-time-major", "chunked-parallel", "recurrent"])
def test_gradcheck_every_input_and_final_state(complex_a, b_kind, c_kind, algorithm, parallel, monkeypatch):
    if parallel:  # see chunked_layout
        monkeypatch.setattr(reference, "_PARALLEL_SCAN_LENGTH", 0)
    kw = make_inputs(7, complex_a=complex_a, b_kind=b_kind, c_kind=c_kind, b=1, d=4, n=2, l=5)
    inputs = tuple(kw[name].detach().clone().requires_grad_() for name in GRAD_INPUTS)

    def f(*tensors):
        return selective_scan(**dict(zip(GRAD_INPUTS, tensors)), delta_softplus=True,
                              return_final_state=True, algorithm=algorithm)

    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------------
# State passing

SPLIT_CASES = [
    pytest.param(False, "var", "grp2", 1, id="real-split1"),
    pytest.param(False, "const", "var", 20, id="real-split20"),
    pytest.param(True, "var", "const", 16, id="complex-split16"),
    pytest.param(True, "grp3", "var", 32, id="complex-split32"),
]


@pytest.mark.parametrize("complex_a,b_kind,c_kind,k", SPLIT_CASES)
def test_state_passing_equals_one_run(complex_a, b_kind, c_kind, k):
    l = 33
    kw = make_inputs(k, complex_a=complex_a, b_kind=b_kind, c_kind=c_kind, l=l)
    y_full, h_full = selective_scan(**kw, return_final_state=True)

    def part(lo, hi, initial_state):
        sliced = dict(kw, initial_state=initial_state)
        for name in ("u", "delta", "z"):
            sliced[name] = kw[name][..., lo:hi]
        for name in ("B", "C"):
            if kw[name].dim() > 2:  # interleaved complex: two entries per token
                f = 2 if complex_a else 1
                sliced[name] = kw[name][..., f * lo:f * hi]
        return selective_scan(**sliced, return_final_state=True)

    y1, h1 = part(0, k, kw["initial_state"])
    y2, h2 = part(k, l, h1)
    assert_close(torch.cat([y1, y2], dim=-1), y_full, 1e-12, "y")
    assert_close(h2, h_full, 1e-12, "final state")


# ---------------------------------------------------------------------------------------------
# dtypes

# Tolerances on y: the rounding of y itself to the output dtype is up to 2^-9 (bf16) / 2^-12
# (fp16) relative per element. The state is returned in float32 and must carry no low-precision
# error at all (it would be ~1e-2 if any state math ran in bf16/fp16).
DTYPE_CASES = [
    pytest.param(torch.bfloat16, torch.float32, False, True, 5e-3, id="bf16-fp32params"),
    pytest.param(torch.float16, torch.float32, False, True, 1e-3, id="fp16-fp32params"),
    pytest.param(torch.float32, torch.float32, False, True, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, False, True, 5e-3, id="bf16-bf16params"),
    pytest.param(torch.bfloat16, torch.bfloat16, False, False, 5e-3, id="bf16-no-delta_bias"),
    pytest.param(torch.float16, torch.float16, True, False, 1e-3, id="fp16-complex64-no-delta_bias"),
    pytest.param(torch.bfloat16, torch.float32, True, True, 5e-3, id="bf16-complex64"),
    pytest.param(torch.float32, torch.float32, True, True, 1e-5, id="fp32-complex64"),
]


@pytest.mark.parametrize("dtype,param_dtype,complex_a,delta_bias,tol", DTYPE_CASES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_low_precision_matches_float64(dtype, param_dtype, complex_a, delta_bias, tol, algorithm):
    kw = make_inputs(3, complex_a=complex_a, b_kind="var", c_kind="grp2", l=65, dtype=dtype,
                     param_dtype=param_dtype, delta_bias=delta_bias, initial_state=not complex_a)
    y, h = selective_scan(**kw, return_final_state=True, algorithm=algorithm)
    # The float64 result on the very same (already rounded) values.
    wide = {k: (v.to(torch.complex128) if v.is_complex() else v.double()) if isinstance(v, torch.Tensor) else v
            for k, v in kw.items()}
    y_ref, h_ref = selective_scan(**wide, return_final_state=True, algorithm="recurrent")
    assert y.dtype == dtype
    assert h.dtype == (torch.complex64 if complex_a else torch.float32)
    assert relative_error(y, y_ref) < tol
    assert relative_error(h, h_ref) < 1e-6


@pytest.mark.parametrize("complex_a", [False, True], ids=["float64-params", "complex128-params"])
def test_wide_parameters_give_wide_state_but_keep_output_dtype(complex_a):
    # Only A is wide in the complex case (B, C interleaved float32; no D, delta_bias, h0).
    kw = make_inputs(4, complex_a=complex_a, dtype=torch.float32, param_dtype=torch.float64,
                     D=not complex_a, delta_bias=not complex_a, initial_state=not complex_a)
    y, h = selective_scan(**kw, return_final_state=True)
    assert y.dtype == torch.float32
    assert h.dtype == (torch.complex128 if complex_a else torch.float64)


# ---------------------------------------------------------------------------------------------
# Validation


def _set(**changes):
    return lambda kw: kw.update(changes)


def _complex_base(kw):
    kw.update(make_inputs(0, complex_a=True, b=2, d=6, n=4, l=7))


ERROR_CASES = [
    pytest.param(_set(u=[[[1.0]]]), TypeError, "u", id="u-not-tensor"),
    pytest.param(_set(u=torch.ones(2, 6, 7, dtype=torch.int64)), TypeError, "u", id="u-int"),
    pytest.param(_set(u=torch.randn(6, 7)), ValueError, "u", id="u-2d"),
    pytest.param(_set(u=torch.randn(2, 6, 0)), ValueError, "u", id="u-empty-length"),
    pytest.param(_set(delta=torch.rand(2, 6, 8)), ValueError, "delta", id="delta-length"),
    pytest.param(_set(delta=torch.rand(2, 6, 7).to(torch.complex64)), TypeError, "delta", id="delta-complex"),
    pytest.param(_set(A=-torch.rand(5, 4)), ValueError, "A", id="A-channels"),
    pytest.param(_set(A=torch.ones(6, 4, dtype=torch.int32)), TypeError, "A", id="A-int"),
    pytest.param(_set(B=torch.randn(3, 4, 7)), ValueError, "B", id="B-batch"),
    pytest.param(_set(B=torch.randn(2, 4, 6)), ValueError, "B", id="B-length"),
    pytest.param(_set(B=torch.randn(2, 1, 1, 4, 7)), ValueError, "B", id="B-5d"),
    pytest.param(_set(B=torch.randn(6, 5)), ValueError, "B", id="B-const-state-size"),
    pytest.param(_set(C=torch.randn(2, 4, 4, 7)), ValueError, "C", id="C-groups-not-dividing-d"),
    pytest.param(_set(C=torch.randn(6, 4, dtype=torch.complex64)), TypeError, "C", id="C-complex-with-real-A"),
    pytest.param(_set(D=torch.randn(5)), ValueError, "D", id="D-length"),
    pytest.param(_set(D=torch.randn(6, device="meta")), ValueError, "D", id="D-device"),
    pytest.param(_set(z=torch.randn(2, 6, 8)), ValueError, "z", id="z-shape"),
    pytest.param(_set(delta_bias=torch.randn(7)), ValueError, "delta_bias", id="delta_bias-length"),
    pytest.param(_set(delta_softplus=1), TypeError, "delta_softplus", id="delta_softplus-int"),
    pytest.param(_set(initial_state=torch.randn(2, 6, 3)), ValueError, "initial_state", id="h0-shape"),
    pytest.param(_set(initial_state=torch.randn(2, 6, 4, dtype=torch.complex64)), ValueError, "initial_state",
                 id="h0-complex-with-real-A"),
    pytest.param(_set(algorithm="parallel"), ValueError, "algorithm", id="algorithm-unknown"),
    pytest.param(lambda kw: (_complex_base(kw), kw.update(B=torch.randn(2, 4, 7))), ValueError, "B",
                 id="complex-B-length-not-2l"),
    pytest.param(lambda kw: (_complex_base(kw), kw.update(C=torch.randn(2, 3, 4, 13))), ValueError, "C",
                 id="complex-grouped-C-length-not-2l"),
    pytest.param(lambda kw: (_complex_base(kw), kw.update(B=torch.randn(6, 4))), TypeError, "B",
                 id="complex-const-B-real"),
    pytest.param(lambda kw: (_complex_base(kw), kw.update(C=torch.randn(2, 4, 7, dtype=torch.complex64))),
                 TypeError, "C", id="complex-var-C-complex-dtype"),
    pytest.param(lambda kw: (_complex_base(kw), kw.update(initial_state=torch.randn(2, 6, 4))), ValueError,
                 "initial_state", id="h0-real-with-complex-A"),
]


@pytest.mark.parametrize("mutate,error,name", ERROR_CASES)
def test_bad_input_raises(mutate, error, name):
    kw = make_inputs(0, dtype=torch.float32, b=2, d=6, n=4, l=7)
    mutate(kw)
    with pytest.raises(error, match=rf"^{name}:"):
        selective_scan(**kw)
