"""The Mamba-3 decode step: the reference against ``mamba3`` at l = 1 and over token loops, the
Triton kernel against the reference (interpreter on CPU, natively on a GPU) for SISO and MIMO,
in-place state updates, input errors and dispatch."""

import pytest
import torch

from mambakit.ops.mamba3 import Mamba3State, mamba3_reference, mamba3_step, mamba3_step_reference
from tests.utils import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# Relative (norm) errors. y is rounded to the input dtype once; phi and H stay float32, K_prev and x_prev take the input dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_case(b, h, p, g, n, r, n_angles, *, optional=True, dtype=torch.float32, seed=0, device=DEVICE,
              mix=True):
    """(keyword arguments of mamba3_step without the state, the state) for one token."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.float64 if dtype == torch.float64 else torch.float32

    def rn(*shape, to=dtype, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=to)

    def pos(*shape, lo, hi):
        return (lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)).to(device, param)

    mimo = r > 1
    kw = dict(
        x=rn(b, h, p), dt=pos(b, h, lo=1e-3, hi=0.5), A=-pos(b, h, lo=1e-2, hi=2.0), B=rn(b, r, g, n),
        C=rn(b, r, g, n), trap=rn(b, h, to=param), angles=rn(b, h, n_angles, to=param),
        D=rn(h, to=param) if optional else None, z=rn(b, h, p) if optional else None,
        B_bias=rn(h, r, n, to=param, scale=0.3) if optional else None,
        C_bias=rn(h, r, n, to=param, scale=0.3) if optional else None,
        mimo_x=rn(h, r, p, to=param) if mimo else None,
        mimo_z=rn(h, r, p, to=param) if mimo and optional else None,
        mimo_o=rn(h, r, p, to=param) if mimo and mix else None,
    )
    state = Mamba3State(phi=pos(b, h, n_angles, lo=0.0, hi=6.28), H=rn(b, h, p, n, to=param),
                        K_prev=rn(b, r, h, n), x_prev=rn(b, h, p))
    return kw, state


def clone_state(state):
    return Mamba3State(*(t.clone() for t in state))


PARAMS = ("D", "B_bias", "C_bias", "mimo_x", "mimo_z", "mimo_o")


def via_mamba3(kw, state, layout=None):
    """mamba3_reference over a one-token sequence from ``state``: (y, final state)."""
    one = {k: (None if v is None else v[:, None]) for k, v in kw.items() if k not in PARAMS}
    params = {k: kw[k] for k in PARAMS}
    y, final = mamba3_reference(one["x"], one["dt"], one["A"], one["B"], one["C"], one["trap"], one["angles"],
                                z=one["z"], initial_state=state, return_final_state=True, rope_layout=layout,
                                **params)
    return y[:, 0], final


# (b, h, p, g, n, r, n_angles): SISO at rope fractions 0.5 and 1, MIMO ranks 2, 4 and 8, groups,
# head dims and state sizes that are not powers of two.
SHAPES = [
    pytest.param((2, 4, 8, 2, 16, 1, 4), id="siso-half"),
    pytest.param((1, 3, 5, 1, 12, 1, 6), id="siso-full-odd"),
    pytest.param((2, 2, 6, 1, 8, 2, 2), id="mimo2"),
    pytest.param((1, 4, 4, 2, 16, 4, 8), id="mimo4-groups"),
    pytest.param((1, 2, 3, 1, 8, 8, 4), id="mimo8"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("optional", [True, False], ids=["all", "bare"])
@pytest.mark.parametrize("layout", [None, "halves", "interleaved"])
def test_reference_step_is_mamba3_at_length_one(shape, optional, layout):
    kw, state = make_case(*shape, optional=optional, dtype=torch.float64, device="cpu")
    y_seq, final = via_mamba3(kw, state, layout)
    updated = clone_state(state)
    y = mamba3_step_reference(**kw, state=updated, rope_layout=layout)
    assert_close(y, y_seq, 1e-12, "y")
    for name, got, want in zip(Mamba3State._fields, updated, final):
        assert_close(got, want.to(got.dtype), 1e-12, name)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]])
def test_reference_in_place_and_differentiable_paths_agree(shape):
    """Without a gradient the reference updates H where it lies; with one (x requires grad) it
    builds the new state out of place so that y stays differentiable. Same values either way."""
    kw, state = make_case(*shape, dtype=torch.float64, device="cpu")
    fast, slow = clone_state(state), clone_state(state)
    y_fast = mamba3_step_reference(**kw, state=fast)
    x = kw["x"].clone().requires_grad_()
    y_slow = mamba3_step_reference(**dict(kw, x=x), state=slow)
    (grad,) = torch.autograd.grad(y_slow.sum(), x)
    assert_close(y_slow.detach(), y_fast, 1e-12, "y")
    for name, got, want in zip(Mamba3State._fields, slow, fast):
        assert_close(got, want, 1e-12, name)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]])
def test_reference_steps_follow_a_sequence(shape):
    """Token after token from zeros equals one mamba3 call over the whole sequence."""
    b, h, p, g, n, r, a = shape
    tokens = [make_case(*shape, dtype=torch.float64, device="cpu", seed=s)[0] for s in range(7)]
    params = {k: tokens[0][k] for k in PARAMS}
    state = Mamba3State(*(torch.zeros(*size, dtype=torch.float64) for size in
                          ((b, h, a), (b, h, p, n), (b, r, h, n), (b, h, p))))
    ys = [mamba3_step_reference(**{**kw, **params}, state=state) for kw in tokens]
    seq = {k: torch.stack([kw[k] for kw in tokens], dim=1) for k in ("x", "dt", "A", "B", "C", "trap", "angles", "z")}
    y_seq, final = mamba3_reference(**seq, **params, return_final_state=True, chunk_size=3)
    assert_close(torch.stack(ys, dim=1), y_seq, 1e-10, "y")
    for name, got, want in zip(Mamba3State._fields, state, final):
        assert_close(got, want, 1e-10, name)


def run_kernel_against_reference(shape, dtype, optional=True, mix=True, layout=None):
    kw, state = make_case(*shape, optional=optional, dtype=dtype, mix=mix)
    if dtype != torch.float32:
        state = Mamba3State(state.phi, state.H, state.K_prev.to(dtype), state.x_prev.to(dtype))
    ref_state, tri_state = clone_state(state), clone_state(state)
    y_ref = mamba3_step(**kw, state=ref_state, rope_layout=layout, backend="reference")
    y_tri = mamba3_step(**kw, state=tri_state, rope_layout=layout, backend="triton")
    assert y_tri.dtype == y_ref.dtype == dtype and y_tri.shape == y_ref.shape
    tol = TOL[dtype]
    assert_close(y_tri, y_ref, tol, "y")
    for name, got, want in zip(Mamba3State._fields, tri_state, ref_state):
        assert got.dtype == want.dtype
        assert_close(got, want, tol, name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("optional", [True, False], ids=["all", "bare"])
def test_triton_step_matches_reference(shape, optional):
    pytest.importorskip("triton")
    run_kernel_against_reference(shape, torch.float32, optional)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]])
def test_triton_step_low_precision(shape, dtype):
    pytest.importorskip("triton")
    run_kernel_against_reference(shape, dtype)


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_triton_step_unmixed_ranks_and_layouts(layout):
    pytest.importorskip("triton")
    run_kernel_against_reference((2, 2, 6, 1, 8, 4, 4), torch.float32, mix=False, layout=layout)


def test_triton_step_reads_strided_inputs():
    """x, B, C and the rest as views into one projection row, the angles broadcast over heads (the
    layer's layout): the same result as contiguous copies."""
    pytest.importorskip("triton")
    b, h, p, g, n, r, a = 2, 4, 8, 2, 16, 2, 4
    kw, state = make_case(b, h, p, g, n, r, a)
    wide = torch.randn(b, 2 * h * p + 2 * r * g * n + 3 * h, device=DEVICE)
    sizes = [h * p, h * p, r * g * n, r * g * n, h, h, h]
    z, x, B, C, dt, A, trap = torch.split(wide, sizes, dim=-1)
    kw.update(x=x.view(b, h, p), z=z.view(b, h, p), B=B.view(b, r, g, n), C=C.view(b, r, g, n),
              dt=dt.abs() * 0.3, A=-A.abs(), trap=trap, angles=torch.randn(b, 1, a, device=DEVICE).expand(b, h, a))
    ref_state, tri_state = clone_state(state), clone_state(state)
    y_ref = mamba3_step(**kw, state=ref_state, backend="reference")
    y_tri = mamba3_step(**kw, state=tri_state, backend="triton")
    assert_close(y_tri, y_ref, 1e-5, "y")
    for name, got, want in zip(Mamba3State._fields, tri_state, ref_state):
        assert_close(got, want, 1e-5, name)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_triton_step_real_sizes(dtype, r):
    """A 1.5B-class layer's heads (h 32, p 64, n 128) at batch 16."""
    run_kernel_against_reference((16, 32, 64, 1, 128, r, 32 if r == 1 else 64), dtype)


def test_step_errors_name_the_argument():
    kw, state = make_case(2, 4, 8, 2, 16, 1, 4, device="cpu")
    with pytest.raises(ValueError, match="dt"):
        mamba3_step(**dict(kw, dt=kw["dt"][:, :2]), state=state)
    with pytest.raises(ValueError, match="angles"):
        mamba3_step(**dict(kw, angles=torch.randn(2, 4, 9)), state=state)
    with pytest.raises(TypeError, match="state"):
        mamba3_step(**kw, state=list(state))
    with pytest.raises(ValueError, match="state.H"):
        mamba3_step(**kw, state=state._replace(H=state.H[:, :, :4]))
    with pytest.raises(ValueError, match="mimo_x"):
        mamba3_step(**dict(kw, mimo_x=torch.randn(4, 1, 8)), state=state)
    mimo_kw, mimo_state = make_case(2, 4, 8, 2, 16, 2, 4, device="cpu")
    with pytest.raises(ValueError, match="mimo_z"):
        mamba3_step(**dict(mimo_kw, mimo_z=None), state=mimo_state)
    with pytest.raises(ValueError, match="rope_layout"):
        mamba3_step(**kw, state=state, rope_layout="pairs")


def test_float64_does_not_take_the_kernel():
    pytest.importorskip("triton")
    kw, state = make_case(1, 2, 4, 1, 8, 1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        mamba3_step(**kw, state=state, backend="triton")
    before = clone_state(state)
    mamba3_step(**kw, state=state)  # auto: the reference
    assert not torch.equal(state.H, before.H)
