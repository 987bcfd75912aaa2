import cmath
import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops import mamba3
from mambakit.ops.mamba3 import Mamba3State
from tests.utils import assert_close

F64 = torch.float64


def make_inputs(b, l, h, p, n, r, g, n_angles, *, seed, dtype=F64, D=True, z=True, bias=True, state=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)

    args = dict(
        x=rnd(b, l, h, p),
        dt=(torch.rand(b, l, h, generator=gen, dtype=F64) * 0.5 + 0.05).to(dtype),
        A=(-torch.rand(b, l, h, generator=gen, dtype=F64) * 2 - 0.1).to(dtype),
        B=rnd(b, l, r, g, n),
        C=rnd(b, l, r, g, n),
        trap=rnd(b, l, h),
        angles=rnd(b, l, h, n_angles),
    )
    if D:
        args["D"] = rnd(h)
    if z:
        args["z"] = rnd(b, l, h, p)
    if bias:
        args["B_bias"], args["C_bias"] = rnd(h, r, n), rnd(h, r, n)
    if r > 1:
        args["mimo_x"], args["mimo_o"] = rnd(h, r, p), rnd(h, r, p)
        if z:
            args["mimo_z"] = rnd(h, r, p)
    if state:
        args["initial_state"] = Mamba3State(
            phi=(torch.rand(b, h, n_angles, generator=gen, dtype=F64) * 2 * math.pi).to(dtype),
            H=torch.randn(b, h, p, n, generator=gen, dtype=F64).to(torch.float32 if dtype != F64 else F64),
            K_prev=rnd(b, r, h, n),
            x_prev=rnd(b, h, p),
        )
    return args


def naive_mamba3(x, dt, A, B, C, trap, angles, D=None, z=None, B_bias=None, C_bias=None, mimo_x=None, mimo_z=None,
                 mimo_o=None, initial_state=None, layout=None):
    """Scalar loops over (batch, head, token), rotation by complex multiplication: independent of
    the library's tensor code."""
    b, l, h, p = x.shape
    r, g, n = B.shape[2:]
    n_angles = angles.shape[3]
    layout = layout or ("interleaved" if r == 1 else "halves")
    pairs = [(2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + n // 2) for j in range(n_angles)]
    y = torch.zeros(b, l, h, p, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            if initial_state is None:
                phi = [0.0] * n_angles
                H = torch.zeros(p, n, dtype=F64)
                K_prev = torch.zeros(r, n, dtype=F64)
                x_prev = torch.zeros(p, dtype=F64)
            else:
                phi = initial_state.phi[bi, hi].tolist()
                H = initial_state.H[bi, hi].clone()
                K_prev = initial_state.K_prev[bi, :, hi].clone()
                x_prev = initial_state.x_prev[bi, hi].clone()
            mx = mimo_x[hi] if mimo_x is not None else torch.ones(1, p, dtype=F64)
            for t in range(l):
                delta = dt[bi, t, hi].item()
                lam = 1 / (1 + math.exp(-trap[bi, t, hi].item()))
                alpha = math.exp(delta * A[bi, t, hi].item())
                phi = [phi[j] + math.pi * math.tanh(angles[bi, t, hi, j].item()) * delta for j in range(n_angles)]

                def rot(vec):
                    out = vec.clone()
                    for j, (i1, i2) in enumerate(pairs):
                        w = complex(vec[i1].item(), vec[i2].item()) * cmath.exp(1j * phi[j])
                        out[i1], out[i2] = w.real, w.imag
                    return out

                K = torch.stack([rot(B[bi, t, k, gi] + (B_bias[hi, k] if B_bias is not None else 0)) for k in range(r)])
                Q = torch.stack([rot(C[bi, t, k, gi] + (C_bias[hi, k] if C_bias is not None else 0)) for k in range(r)])
                v = x[bi, t, hi] * mx  # (r, p)
                v_prev = x_prev * mx
                H = (alpha * H + (1 - lam) * delta * alpha * sum(torch.outer(v_prev[k], K_prev[k]) for k in range(r))
                     + lam * delta * sum(torch.outer(v[k], K[k]) for k in range(r)))
                out = torch.zeros(p, dtype=F64)
                for k in range(r):
                    yk = H @ Q[k] + (D[hi] * v[k] if D is not None else 0)
                    if r == 1:
                        out = yk * (F.silu(z[bi, t, hi]) if z is not None else 1)
                    else:
                        gate = F.silu(z[bi, t, hi] * mimo_z[hi, k]) if z is not None else 1
                        out = out + yk * gate * mimo_o[hi, k]
                y[bi, t, hi] = out
                K_prev, x_prev = K, x[bi, t, hi]
    return y


NAIVE_CASES = [
    pytest.param(dict(b=2, l=6, h=2, p=3, n=4, r=1, g=1, n_angles=1), id="siso-rope0.5"),
    pytest.param(dict(b=1, l=5, h=2, p=2, n=4, r=1, g=2, n_angles=2), id="siso-rope1.0-g2"),
    pytest.param(dict(b=1, l=5, h=2, p=3, n=6, r=2, g=1, n_angles=3), id="mimo2-rope1.0"),
    pytest.param(dict(b=1, l=4, h=2, p=2, n=8, r=4, g=2, n_angles=2), id="mimo4-rope0.5"),
]


@pytest.mark.parametrize("shape", NAIVE_CASES)
@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_matches_independent_scalar_loop(shape, algorithm):
    args = make_inputs(**shape, seed=11, state=True)
    expected = naive_mamba3(**args)
    got = mamba3(**args, algorithm=algorithm, chunk_size=3)
    assert_close(got, expected, 1e-12, algorithm)


def test_rope_layout_override():
    args = make_inputs(b=1, l=5, h=2, p=2, n=4, r=1, g=1, n_angles=2, seed=12)
    got = mamba3(**args, rope_layout="halves")
    assert_close(got, naive_mamba3(**args, layout="halves"), 1e-12, "halves")
    assert (got - mamba3(**args)).abs().max() > 1e-3  # the layout matters


CASES = [
    pytest.param(dict(b=2, l=1, h=2, p=3, n=4, r=1, g=1, n_angles=1), 4, id="l1"),
    pytest.param(dict(b=2, l=7, h=4, p=3, n=8, r=1, g=2, n_angles=2), 4, id="siso-l7-rope0.5"),
    pytest.param(dict(b=1, l=13, h=2, p=4, n=8, r=1, g=1, n_angles=4), 4, id="siso-l13-rope1.0"),
    pytest.param(dict(b=1, l=16, h=2, p=4, n=6, r=1, g=1, n_angles=0), 4, id="siso-norope-l16"),
    pytest.param(dict(b=2, l=11, h=2, p=3, n=8, r=2, g=1, n_angles=2), 3, id="mimo2-l11"),
    pytest.param(dict(b=1, l=13, h=4, p=5, n=8, r=4, g=2, n_angles=4), 4, id="mimo4-l13-g2"),
]
OPTIONS = [
    pytest.param(dict(), id="all"),
    pytest.param(dict(D=False, z=False, bias=False), id="bare"),
    pytest.param(dict(state=True), id="initial-state"),
]


@pytest.mark.parametrize("shape,chunk_size", CASES)
@pytest.mark.parametrize("options", OPTIONS)
def test_chunked_equals_recurrent(shape, chunk_size, options):
    args = make_inputs(**shape, **options, seed=shape["l"] * 7 + shape["r"])
    y_rec, s_rec = mamba3(**args, algorithm="recurrent", return_final_state=True)
    y_chk, s_chk = mamba3(**args, chunk_size=chunk_size, return_final_state=True)
    assert_close(y_chk, y_rec, 1e-10, "y")
    for name, a, b in zip(Mamba3State._fields, s_chk, s_rec):
        assert_close(a, b, 1e-10, name)


def _outputs_for_gradcheck(y, state):
    # cos/sin of the phase instead of the phase itself: phi is reduced mod 2 pi, which is not
    # differentiable where it wraps, while everything downstream only sees cos/sin.
    return y, state.H, state.K_prev, state.x_prev, torch.cos(state.phi), torch.sin(state.phi)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param(dict(b=1, l=5, h=2, p=2, n=4, r=1, g=1, n_angles=1), id="siso"),
        pytest.param(dict(b=1, l=4, h=2, p=2, n=4, r=2, g=2, n_angles=2), id="mimo2"),
    ],
)
def test_gradcheck_every_input(shape):
    args = make_inputs(**shape, seed=21, state=True)
    names = [k for k in args if k != "initial_state"]
    state = args.pop("initial_state")
    tensors = [args[k].clone().requires_grad_() for k in names] + [t.clone().requires_grad_() for t in state]

    def f(*ts):
        kw = dict(zip(names, ts[: len(names)]))
        y, final = mamba3(**kw, initial_state=Mamba3State(*ts[len(names):]), return_final_state=True, chunk_size=3)
        return _outputs_for_gradcheck(y, final)

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("shape", [c.values[0] for c in CASES[1:]], ids=[c.id for c in CASES[1:]])
def test_state_passing(shape):
    args = make_inputs(**shape, seed=31, state=True)
    y_full, s_full = mamba3(**args, chunk_size=4, return_final_state=True)
    k = shape["l"] // 2 + 1
    per_token = ("x", "dt", "A", "B", "C", "trap", "angles", "z")
    first = {key: (v[:, :k] if key in per_token else v) for key, v in args.items()}
    second = {key: (v[:, k:] if key in per_token else v) for key, v in args.items() if key != "initial_state"}
    y1, s1 = mamba3(**first, chunk_size=4, return_final_state=True)
    y2, s2 = mamba3(**second, initial_state=s1, chunk_size=4, return_final_state=True)
    assert_close(torch.cat([y1, y2], dim=1), y_full, 1e-11, "y")
    assert_close(s2.H, s_full.H, 1e-11, "H")
    assert_close(s2.K_prev, s_full.K_prev, 1e-11, "K_prev")
    assert_close(torch.cos(s2.phi), torch.cos(s_full.phi), 1e-11, "phi")
    assert (s_full.phi >= 0).all() and (s_full.phi < 2 * math.pi).all()


PER_TOKEN = ("x", "dt", "A", "B", "C", "trap", "angles", "z")


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("algorithm,chunk_size", [("chunked", 4), ("chunked", 16), ("recurrent", 4)])
def test_packed_sequences_equal_separate_calls(r, algorithm, chunk_size):
    """Row 0 packs lengths 5, 6, 4 with a reused id (3, 7, 3), row 1 two sequences; each piece
    run alone (the first from the initial state, the rest from zeros) gives the same outputs, and
    the final state is the last piece's."""
    l = 15
    args = make_inputs(b=2, l=l, h=2, p=3, n=8, r=r, g=1, n_angles=2, seed=71, state=True)
    seq_idx = torch.tensor([[3] * 5 + [7] * 6 + [3] * 4, [0] * 9 + [1] * 6])
    y, final = mamba3(**args, seq_idx=seq_idx, chunk_size=chunk_size, algorithm=algorithm, return_final_state=True)
    for row, bounds in enumerate([(0, 5, 11, 15), (0, 9, 15)]):
        for piece, (start, stop) in enumerate(zip(bounds, bounds[1:])):
            part = {k: (v[row:row + 1, start:stop] if k in PER_TOKEN else v) for k, v in args.items()
                    if k != "initial_state"}
            if piece == 0:
                part["initial_state"] = Mamba3State(*(t[row:row + 1] for t in args["initial_state"]))
            y_part, s_part = mamba3(**part, chunk_size=chunk_size, return_final_state=True)
            assert_close(y[row:row + 1, start:stop], y_part, 1e-11, f"row {row} piece {piece}")
        for name, got, want in zip(Mamba3State._fields, final, s_part):
            assert_close(got[row:row + 1], want, 1e-11, f"final {name}")


def test_packed_sequences_gradcheck():
    args = make_inputs(b=1, l=7, h=2, p=2, n=4, r=2, g=1, n_angles=1, seed=72, state=True)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    names = ["x", "dt", "A", "B", "C", "trap", "angles", "z", "mimo_x"]

    def f(*leaves):
        y, state = mamba3(**dict(args, **dict(zip(names, leaves))), seq_idx=seq_idx, chunk_size=3,
                          return_final_state=True)
        return _outputs_for_gradcheck(y, state)

    leaves = [args[k].detach().clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("r", [1, 4])
def test_low_precision_inputs(dtype, tol, r):
    shape = dict(b=2, l=37, h=4, p=8, n=16, r=r, g=1, n_angles=4)
    args = make_inputs(**shape, seed=41, dtype=dtype, state=True)
    y, state = mamba3(**args, chunk_size=16, return_final_state=True)
    assert y.dtype == dtype and state.H.dtype == torch.float32
    exact_args = {k: (Mamba3State(*(t.double() for t in v)) if k == "initial_state" else v.double()) for k, v in args.items()}
    y_ref, state_ref = mamba3(**exact_args, algorithm="recurrent", return_final_state=True)
    assert_close(y, y_ref, tol, "y")
    assert_close(state.H, state_ref.H, tol, "H")


def test_long_phase_stays_accurate_in_float32():
    # Phase accumulates over 20k tokens to ~1e4 rad; float32 cos/sin must still see it to ~1e-6.
    shape = dict(b=1, l=20000, h=1, p=2, n=4, r=1, g=1, n_angles=2)
    args = make_inputs(**shape, seed=51, dtype=torch.float32)
    args["angles"] = torch.full_like(args["angles"], 3.0)
    args["dt"] = torch.full_like(args["dt"], 0.2)
    _, state = mamba3(**args, return_final_state=True, chunk_size=256)
    increment = (math.pi * torch.tanh(torch.tensor(3.0)) * torch.tensor(0.2)).item()  # float32 per step
    expected = math.fmod(20000 * increment, 2 * math.pi)
    assert abs(math.cos(state.phi[0, 0, 0].item()) - math.cos(expected)) < 1e-5
    assert abs(math.sin(state.phi[0, 0, 0].item()) - math.sin(expected)) < 1e-5


BAD = [
    ("x", lambda a: a.update(x=a["x"][0]), ValueError, "x: expected 4 dimensions"),
    ("B-shape", lambda a: a.update(B=a["B"][:, :-1]), ValueError, "B: expected shape"),
    ("C-shape", lambda a: a.update(C=a["C"][..., :-1]), ValueError, "C: expected shape"),
    ("groups", lambda a: a.update(B=torch.randn(1, 5, 1, 3, 8), C=torch.randn(1, 5, 1, 3, 8)), ValueError, "must divide"),
    ("dt", lambda a: a.update(dt=a["dt"][:, :-1]), ValueError, "dt: expected shape"),
    ("trap-dtype", lambda a: a.update(trap=a["trap"].long()), TypeError, "trap: expected dtype"),
    ("angles-too-many", lambda a: a.update(angles=torch.randn(1, 5, 2, 5)), ValueError, "angles: expected at most"),
    ("D", lambda a: a.update(D=torch.randn(3)), ValueError, "D: expected shape"),
    ("z", lambda a: a.update(z=torch.randn(1, 5, 2, 4)), ValueError, "z: expected shape"),
    ("bias", lambda a: a.update(B_bias=torch.randn(2, 2, 8)), ValueError, "B_bias: expected shape"),
    ("mimo-on-siso", lambda a: a.update(mimo_x=torch.randn(2, 1, 3)), ValueError, "mimo_x: only used"),
    ("state-type", lambda a: a.update(initial_state=[1, 2]), TypeError, "initial_state: expected a tuple"),
    ("state-H", lambda a: a.update(initial_state=Mamba3State(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3, 7), torch.zeros(1, 1, 2, 8), torch.zeros(1, 2, 3))), ValueError, "initial_state.H"),
    ("list", lambda a: a.update(x=a["x"].tolist()), TypeError, "x: expected a torch.Tensor"),
    ("chunk", lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
    ("algorithm", lambda a: a.update(algorithm="fast"), ValueError, "algorithm: expected one of"),
    ("layout", lambda a: a.update(rope_layout="spiral"), ValueError, "rope_layout"),
    ("empty", lambda a: a.update(**{k: a[k][:, :0] for k in ("x", "dt", "A", "B", "C", "trap", "angles", "z")}), ValueError, "l >= 1"),
    ("seq_idx-shape", lambda a: a.update(seq_idx=torch.zeros(1, 4, dtype=torch.long)), ValueError, "seq_idx: expected shape"),
    ("seq_idx-dtype", lambda a: a.update(seq_idx=torch.zeros(1, 5)), TypeError, "seq_idx: expected dtype"),
]


@pytest.mark.parametrize("mutate,error,match", [pytest.param(m, e, s, id=i) for i, m, e, s in BAD])
def test_bad_input(mutate, error, match):
    args = make_inputs(b=1, l=5, h=2, p=3, n=8, r=1, g=1, n_angles=2, seed=61, dtype=torch.float32)
    mutate(args)
    with pytest.raises(error, match=match):
        mamba3(**args)


def test_device_mismatch():
    args = make_inputs(b=1, l=5, h=2, p=3, n=8, r=1, g=1, n_angles=2, seed=63, dtype=torch.float32)
    args["D"] = args["D"].to("meta")
    with pytest.raises(ValueError, match="D: expected device cpu"):
        mamba3(**args)


@pytest.mark.parametrize("algorithm", ["chunked", "recurrent"])
def test_mimo_without_mimo_o_returns_the_ranks_unmixed(algorithm):
    args = make_inputs(b=2, l=9, h=2, p=3, n=8, r=4, g=1, n_angles=2, seed=62, state=True)
    mixed, state = mamba3(**args, chunk_size=4, algorithm=algorithm, return_final_state=True)
    ranks, state_unmixed = mamba3(**dict(args, mimo_o=None), chunk_size=4, algorithm=algorithm,
                                  return_final_state=True)
    assert ranks.shape == (2, 9, 2, 4, 3)
    assert_close(torch.einsum("blhrp,hrp->blhp", ranks, args["mimo_o"]), mixed, 1e-12, "mixed by hand")
    for name, got, want in zip(Mamba3State._fields, state_unmixed, state):
        assert_close(got, want, 1e-12, name)


def test_mimo_requires_its_parameters():
    args = make_inputs(b=1, l=3, h=2, p=3, n=8, r=2, g=1, n_angles=2, seed=62)
    args.pop("mimo_x")
    with pytest.raises(ValueError, match="mimo_x: required"):
        mamba3(**args)
    args = make_inputs(b=1, l=3, h=2, p=3, n=8, r=2, g=1, n_angles=2, seed=62, z=False)
    args["mimo_z"] = torch.randn(2, 2, 3, dtype=F64)
    with pytest.raises(ValueError, match="mimo_z: given without z"):
        mamba3(**args)
