import pytest
import torch

from mambakit.ops import linear_scan
from tests.utils import assert_close

METHODS = ["sequential", "hillis_steele", "blelloch", "chunked"]


def explicit_loop(a, b, h0):
    """h_t = a_t h_{t-1} + b_t written out, time on the last axis."""
    out, h = [], h0
    for t in range(b.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append(h)
    return torch.stack(out, dim=-1)


@pytest.mark.parametrize("method", METHODS)
def test_worked_example_integer_decay_is_exact(method):
    # Every intermediate is a small integer, so every method must give it bit for bit.
    h = linear_scan(torch.full((4,), 2.0), torch.tensor([1.0, 3.0, 5.0, 7.0]), method=method)
    assert torch.equal(h, torch.tensor([1.0, 5.0, 15.0, 37.0]))


@pytest.mark.parametrize("method", METHODS)
def test_worked_example_decay_0_9(method):
    # 0.9 has no exact binary form; in float64 the values agree to the last few ulps.
    h = linear_scan(torch.full((4,), 0.9, dtype=torch.float64), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), method=method)
    expected = torch.tensor([1.0, 2.9, 5.61, 9.049], dtype=torch.float64)
    assert torch.allclose(h, expected, rtol=0, atol=1e-14)


CASES = [
    pytest.param(1, 1, id="T1-Q1"),
    pytest.param(2, 4, id="T2"),
    pytest.param(7, 4, id="T7-odd"),
    pytest.param(64, 8, id="T64-pow2"),
    pytest.param(100, 3, id="T100-deep-recursion"),
    pytest.param(257, 64, id="T257"),
]


@pytest.mark.parametrize("T,chunk_size", CASES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_methods_match_explicit_loop(T, chunk_size, method, reverse, dtype):
    g = torch.Generator().manual_seed(T * 31 + chunk_size)
    a = torch.rand(3, T, 5, generator=g, dtype=torch.float64) * 1.2 - 0.1
    b = torch.randn(3, T, 5, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    if dtype.is_complex:
        a = torch.complex(a, torch.rand(3, T, 5, generator=g, dtype=torch.float64) - 0.5)
        b = torch.complex(b, torch.randn(3, T, 5, generator=g, dtype=torch.float64))
        h0 = torch.complex(h0, torch.randn(3, 5, generator=g, dtype=torch.float64))
    h = linear_scan(a, b, h0, dim=1, method=method, reverse=reverse, chunk_size=chunk_size)
    a_t, b_t = a.transpose(1, 2), b.transpose(1, 2)
    if reverse:
        expected = explicit_loop(a_t.flip(-1), b_t.flip(-1), h0).flip(-1)
    else:
        expected = explicit_loop(a_t, b_t, h0)
    assert_close(h, expected.transpose(1, 2), 1e-12, f"{method} T={T}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradcheck(method, reverse):
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 9, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(2, 9, 3, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()

    def f(a, b, h0):
        return linear_scan(a, b, h0, dim=1, method=method, reverse=reverse, chunk_size=2)

    assert torch.autograd.gradcheck(f, (a, b, h0))
    assert torch.autograd.gradgradcheck(f, (a, b, h0))


def test_gradcheck_complex():
    g = torch.Generator().manual_seed(4)
    a = (0.8 * torch.rand(2, 11, generator=g, dtype=torch.complex128)).requires_grad_()
    b = torch.randn(2, 11, generator=g, dtype=torch.complex128).requires_grad_()
    h0 = torch.randn(2, generator=g, dtype=torch.complex128).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, method="chunked", chunk_size=3), (a, b, h0))


def test_backward_is_a_reverse_scan_not_autograd_through_the_loop():
    a = torch.rand(4, 50, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    h = linear_scan(a, b, method="sequential")
    names, stack = [], [h.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    # One custom node plus a few layout/accumulate nodes, however long the sequence.
    assert "_LinearScanBackward" in names
    assert len(names) < 10, names


def test_bfloat16_scan_close_to_float64():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(4, 300, generator=g, dtype=torch.float64)
    b = torch.randn(4, 300, generator=g, dtype=torch.float64)
    ref = linear_scan(a, b, method="sequential")
    for method in METHODS:
        assert_close(linear_scan(a.float(), b.float(), method=method), ref, 1e-5, method)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        pytest.param(dict(a=torch.ones(3), b=torch.ones(4)), ValueError, "a: expected the shape", id="shape"),
        pytest.param(dict(a=torch.ones(3, dtype=torch.float64), b=torch.ones(3)), TypeError, "a: expected the dtype", id="dtype"),
        pytest.param(dict(a=torch.ones(3, dtype=torch.int64), b=torch.ones(3, dtype=torch.int64)), TypeError, "a: expected dtype", id="int"),
        pytest.param(dict(a=[1.0], b=torch.ones(1)), TypeError, "a: expected a torch.Tensor", id="list"),
        pytest.param(dict(a=torch.ones(2, 3), b=torch.ones(2, 3), h0=torch.ones(3)), ValueError, "h0: expected the shape", id="h0-shape"),
        pytest.param(dict(a=torch.ones(2, 3), b=torch.ones(2, 3), dim=2), ValueError, "dim: expected", id="dim"),
        pytest.param(dict(a=torch.ones(3), b=torch.ones(3), method="fast"), ValueError, "method: expected one of", id="method"),
        pytest.param(dict(a=torch.ones(3), b=torch.ones(3), method="chunked", chunk_size=0), ValueError, "chunk_size", id="chunk"),
        pytest.param(dict(a=torch.tensor(1.0), b=torch.tensor(1.0)), ValueError, "b: expected at least one", id="scalar"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_scan(**kwargs)
