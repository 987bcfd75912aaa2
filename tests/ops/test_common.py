import pytest
import torch

from mambakit.ops.common import chunked as core
from mambakit.ops.common import decay_exp
from mambakit.ops.common.decay import decay_exp_
from tests.utils import assert_close

F64 = torch.float64


def make(b, l, h, R, n, p, seed, segments=False):
    g = torch.Generator().manual_seed(seed)
    args = dict(
        q=torch.randn(b, l, h, R, n, generator=g, dtype=F64),
        k=torch.randn(b, l, h, R, n, generator=g, dtype=F64),
        v=torch.randn(b, l, h, R, p, generator=g, dtype=F64),
        log_decay=-torch.rand(b, l, h, generator=g, dtype=F64) * 2,
        key_weight=torch.rand(b, l, h, generator=g, dtype=F64),
        diag_weight=torch.rand(b, l, h, generator=g, dtype=F64),
        initial_state=torch.randn(b, h, p, n, generator=g, dtype=F64),
    )
    if segments:
        args["segment"] = torch.sort(torch.randint(0, 4, (b, l), generator=g), dim=1).values
    return args


def test_segsum_matches_explicit_products():
    x = -torch.rand(2, 7, dtype=F64)
    got = torch.exp(core.segsum(x))
    for i in range(7):
        for j in range(7):
            expected = torch.prod(torch.exp(x[:, j + 1 : i + 1]), dim=-1) if j <= i else torch.zeros(2, dtype=F64)
            assert torch.allclose(got[:, i, j], expected, rtol=1e-14, atol=0)


def test_segsum_keeps_precision_for_huge_decays():
    # log decays of -1e4 per token: differences of a plain cumsum would lose all digits.
    x = torch.full((64,), -1e4, dtype=torch.float32)
    x[10] = -1e-3
    got = core.segsum(x)
    assert got[10, 9].item() == pytest.approx(-1e-3, rel=1e-6)
    assert got[40, 39].item() == -1e4


CASES = [
    pytest.param((2, 1, 2, 1, 3, 2), 4, id="l1"),
    pytest.param((2, 13, 3, 1, 4, 5), 4, id="l13-Q4"),
    pytest.param((1, 17, 2, 4, 3, 2), 5, id="R4-l17-Q5"),
    pytest.param((2, 16, 2, 2, 4, 3), 8, id="l16-Q8"),
    pytest.param((1, 40, 2, 1, 3, 3), 3, id="14-chunks"),
]


@pytest.mark.parametrize("dims,chunk_size", CASES)
@pytest.mark.parametrize("segments", [False, True], ids=["one-sequence", "segments"])
@pytest.mark.parametrize("matrix_pass", [True, False], ids=["matrix-pass", "scan-pass"])
def test_chunked_equals_recurrent(dims, chunk_size, segments, matrix_pass, monkeypatch):
    if not matrix_pass:
        monkeypatch.setattr(core, "MATRIX_PASS_MAX_CHUNKS", 1)
    args = make(*dims, seed=sum(dims), segments=segments)
    y_ref, s_ref = core.recurrent_state_space(**args)
    y, s = core.chunked_state_space(**args, chunk_size=chunk_size)
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(s, s_ref, 1e-12, "final state")


def test_reused_segment_id_does_not_reconnect():
    args = make(1, 10, 2, 1, 3, 2, seed=6)
    args["segment"] = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0, 0]])
    y_ref, s_ref = core.recurrent_state_space(**args)
    y, s = core.chunked_state_space(**args, chunk_size=10)
    assert_close(y, y_ref, 1e-12, "y")
    assert_close(s, s_ref, 1e-12, "final state")


def test_segment_reset_forgets_the_past():
    args = make(1, 12, 2, 1, 3, 2, seed=5)
    args["segment"] = torch.tensor([[0] * 5 + [1] * 7])
    y, s = core.chunked_state_space(**args, chunk_size=4)
    tail = {k: (v[:, 5:] if v.dim() > 1 and v.shape[1] == 12 else v) for k, v in args.items() if k not in ("segment", "initial_state")}
    y_tail, s_tail = core.chunked_state_space(**tail, chunk_size=4)
    assert_close(y[:, 5:], y_tail, 1e-12, "y after reset")
    assert_close(s, s_tail, 1e-12, "state after reset")


@pytest.mark.parametrize("matrix_pass", [True, False], ids=["matrix-pass", "scan-pass"])
def test_gradcheck_with_segments(matrix_pass, monkeypatch):
    if not matrix_pass:
        monkeypatch.setattr(core, "MATRIX_PASS_MAX_CHUNKS", 1)
    args = make(1, 9, 2, 2, 3, 2, seed=7, segments=True)
    segment = args.pop("segment")
    names = list(args)
    tensors = [args[k].requires_grad_() for k in names]

    def f(*ts):
        return core.chunked_state_space(**dict(zip(names, ts)), segment=segment, chunk_size=4)

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decay_exp_flushes_underflow_to_zero_and_keeps_nan(dtype):
    x = torch.tensor([0.0, -1.0, -50.0, -86.9, -87.0, -88.5, -100.0, -1e4, float("-inf"), float("nan")], dtype=dtype)
    got = decay_exp(x)
    want = torch.exp(x)
    assert torch.equal(got[:4], want[:4])
    assert (got[4:9] == 0).all() and (want[4:9] < 1.7e-38).all()
    assert torch.isnan(got[9])
    leaf = x[:4].clone().requires_grad_()
    (grad,) = torch.autograd.grad(decay_exp(leaf).sum(), leaf)
    assert torch.equal(grad, torch.exp(x[:4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_decay_exp_in_place_equals_decay_exp_and_flushes_in_every_dtype(dtype):
    x = torch.cat([torch.linspace(-120.0, 0.0, 4001), torch.tensor([float("-inf"), float("nan")])]).to(dtype)
    want = decay_exp(x)
    work = x.clone()
    got = decay_exp_(work)
    assert got.data_ptr() == work.data_ptr()
    assert torch.equal(got[:-1], want[:-1]) and torch.isnan(got[-1])
    finite = x[:-1]
    clear = (finite.double() + 86.97).abs() > 0.02  # away from the flush edge by more than a rounding
    tiny = torch.exp(finite.double()) <= 1.7e-38
    assert (want[:-1][clear & tiny] == 0).all()
    assert torch.equal(want[:-1][clear & ~tiny], torch.exp(finite)[clear & ~tiny])
