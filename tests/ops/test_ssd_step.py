"""The Mamba-2 decode step: the reference against ``ssd`` at l = 1 and over token loops, the Triton
kernel against the reference (interpreter on CPU, natively on a GPU), in-place state updates,
input errors, dispatch, tracing, and ``Mamba2.step`` against ``forward`` with a cache."""

import pytest
import torch

from mambakit.cache import InferenceCache
from mambakit.layers import Mamba2
from mambakit.ops.ssd import ssd, ssd_step
from mambakit.ops.ssd import step as step_module
from mambakit.ops.ssd.step import ssd_step_reference
from tests.utils import assert_close

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# y is rounded to the input dtype once (both sides compute in fp32 or fp64); the state stays fp32/fp64.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
INF = float("inf")


def make_case(b, h, p, g, n, *, D="head", z=True, bias=True, limit=(0.0, INF), dtype=torch.float32, seed=0,
              device=DEVICE):
    """Keyword arguments of ssd_step (state included) for one token."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape, to=dtype):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=to)

    param = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(
        x=rn(b, h, p), dt=rn(b, h), A=-(torch.rand(h, generator=gen, dtype=torch.float64) + 0.5).to(device, param),
        B=rn(b, g, n), C=rn(b, g, n), state=rn(b, h, p, n, to=param),
        D={"head": rn(h, to=param), "channel": rn(h, p, to=param), None: None}[D],
        z=rn(b, h, p) if z else None, dt_bias=0.5 * rn(h, to=param) if bias else None,
        dt_softplus=bias, dt_limit=limit,
    )


def with_state(kw, state):
    return dict(kw, state=state)


def via_ssd(kw, seq=False):
    """ssd over the token axis (added when not ``seq``) from kw's state: (y, final state)."""
    one = (lambda t: t) if seq else (lambda t: None if t is None else t[:, None])
    y, final = ssd(one(kw["x"]), one(kw["dt"]), kw["A"], one(kw["B"]), one(kw["C"]), chunk_size=4, D=kw["D"],
                   z=one(kw["z"]), dt_bias=kw["dt_bias"], dt_softplus=kw["dt_softplus"], dt_limit=kw["dt_limit"],
                   initial_states=kw["state"], return_final_states=True)
    return (y if seq else y[:, 0]), final


FEATURES = [
    pytest.param(dict(), id="D-head-z-bias"),
    pytest.param(dict(D="channel", z=False), id="D-channel"),
    pytest.param(dict(limit=(0.05, 0.6)), id="dt-limit"),
    pytest.param(dict(D=None, z=False, bias=False), id="bare"),
]
SHAPES = [(2, 4, 8, 1, 16), (3, 6, 5, 3, 7), (1, 8, 16, 2, 32)]  # (b, h, p, g, n)


# ----------------------------------------------------------------------------------------------
# The reference against ssd (on CPU, where ssd is its own reference: the definition, not a kernel)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_matches_ssd_one_token(shape, features, dtype):
    kw = make_case(*shape, dtype=dtype, seed=sum(shape), device="cpu", **features)
    y_ref, final_ref = via_ssd(kw)
    state = kw["state"].clone()
    y = ssd_step_reference(**with_state(kw, state))
    assert y.dtype == dtype and state.dtype == final_ref.dtype
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(state, final_ref, TOL[torch.float64 if dtype == torch.float64 else torch.float32], "state")


@pytest.mark.parametrize("features", FEATURES[:3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_reference_token_loop_matches_ssd_sequence(features, dtype):
    b, l, h, p, g, n = 2, 9, 4, 6, 2, 5
    gen = torch.Generator().manual_seed(3)
    seq = make_case(b, h, p, g, n, dtype=dtype, seed=4, device="cpu", **features)
    seq.update(x=torch.randn(b, l, h, p, generator=gen).to(dtype), dt=torch.randn(b, l, h, generator=gen).to(dtype),
               B=torch.randn(b, l, g, n, generator=gen).to(dtype), C=torch.randn(b, l, g, n, generator=gen).to(dtype),
               z=torch.randn(b, l, h, p, generator=gen).to(dtype) if seq["z"] is not None else None)
    y_ref, final_ref = via_ssd(seq, seq=True)
    state = seq["state"].clone()
    ys = [ssd_step_reference(seq["x"][:, t], seq["dt"][:, t], seq["A"], seq["B"][:, t], seq["C"][:, t], state,
                             D=seq["D"], z=None if seq["z"] is None else seq["z"][:, t], dt_bias=seq["dt_bias"],
                             dt_softplus=seq["dt_softplus"], dt_limit=seq["dt_limit"]) for t in range(l)]
    assert_close(torch.stack(ys, dim=1), y_ref, TOL[dtype], "y")
    assert_close(state, final_ref, TOL[torch.float64 if dtype == torch.float64 else torch.float32], "state")


def test_reference_updates_a_strided_state_in_place():
    """A state that is a strided view (not one block of memory) takes the out-of-place path and is
    still written where it lies."""
    kw = make_case(2, 4, 3, 2, 5, dtype=torch.float32, device="cpu")
    wide = torch.zeros(2, 4, 3, 10)
    strided = wide[..., ::2]
    strided.copy_(kw["state"])
    contiguous = kw["state"].clone()
    y_strided = ssd_step_reference(**with_state(kw, strided))
    y = ssd_step_reference(**with_state(kw, contiguous))
    assert not strided.is_contiguous()
    assert_close(y_strided, y, 1e-6, "y")
    assert_close(wide[..., ::2], contiguous, 1e-6, "state")
    assert (wide[..., 1::2] == 0).all()


def test_reference_keeps_y_differentiable_and_the_state_detached():
    kw = make_case(2, 4, 3, 2, 5, dtype=torch.float64, device="cpu")
    x = kw["x"].clone().requires_grad_()
    A = kw["A"].clone().requires_grad_()
    state = kw["state"].clone()
    y = ssd_step_reference(**dict(kw, x=x, A=A, state=state))
    y.sum().backward()
    assert not state.requires_grad and x.grad is not None and A.grad is not None
    gx, = torch.autograd.grad(via_ssd(dict(kw, x=x))[0].sum(), x)
    assert_close(x.grad, gx, 1e-12, "dx")


# ----------------------------------------------------------------------------------------------
# The Triton kernel against the reference
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["one-block", "2-channel-blocks"])
def blocks(request, monkeypatch):
    """Also cut p into blocks of 2 channels, so that small heads span several programs."""
    if request.param == "2-channel-blocks":
        from mambakit.ops.ssd import step_triton

        monkeypatch.setattr(step_triton, "_block_p", lambda p, np_: 2)
    return request.param


def run_both(kw, tol_y, tol_state=1e-5):
    """Both backends on copies of kw's state; the Triton state must be the same tensor, updated."""
    ref_state, tri_state = kw["state"].clone(), kw["state"].clone()
    ptr = tri_state.data_ptr()
    y_ref = ssd_step(**with_state(kw, ref_state), backend="reference")
    y = ssd_step(**with_state(kw, tri_state), backend="triton")
    assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and tri_state.data_ptr() == ptr
    assert_close(y, y_ref, tol_y, "y")
    assert_close(tri_state, ref_state, tol_state, "state")


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("shape", [(2, 4, 8, 1, 16), (2, 3, 5, 3, 7), (1, 6, 6, 2, 3)], ids=str)
def test_triton_matches_reference_fp32(shape, features, blocks):
    run_both(make_case(*shape, seed=sum(shape), **features), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_half_precision_inputs(dtype):
    run_both(make_case(2, 4, 6, 2, 12, dtype=dtype, seed=5), TOL[dtype])


def test_triton_strided_views_in_place():
    """x, B, C, z, dt as column slices of one projection (as Mamba2.step passes them) and the state
    as a slice of a larger buffer: read where they lie, and nothing outside the slice written."""
    b, h, p, g, n = 2, 4, 6, 2, 5
    gen = torch.Generator().manual_seed(6)
    proj = torch.randn(b, 2 * h * p + 2 * g * n + h, generator=gen).to(DEVICE)
    x, z, B, C, dt = torch.split(proj, [h * p, h * p, g * n, g * n, h], dim=-1)
    buffer = torch.randn(b + 1, h, p, n + 3, generator=gen).to(DEVICE)
    kw = make_case(b, h, p, g, n, seed=7)
    kw.update(x=x.view(b, h, p), z=z.view(b, h, p), B=B.view(b, g, n), C=C.view(b, g, n), dt=dt)
    state, outside = buffer[:b, :, :, :n], buffer.clone()
    expected_state = state.clone()
    y_ref = ssd_step_reference(**with_state(kw, expected_state))
    y = ssd_step(**with_state(kw, state), backend="triton")
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(state, expected_state, 1e-5, "state")
    outside[:b, :, :, :n] = buffer[:b, :, :, :n]
    assert torch.equal(buffer, outside)


def test_triton_backend_runs_the_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    kw = make_case(1, 2, 4, 1, 4, seed=8)
    expected = ssd_step_reference(**with_state(kw, kw["state"].clone()))
    monkeypatch.setattr(step_module, "ssd_step_reference", fail)
    assert_close(ssd_step(**kw, backend="triton"), expected, 1e-5, "y")


@pytest.mark.skipif(CUDA, reason="the auto choice on CPU tensors")
def test_auto_on_cpu_runs_the_reference(monkeypatch):
    from mambakit.ops.ssd import step_triton

    def fail(*args, **kwargs):
        raise AssertionError("the Triton step ran on CPU tensors")

    monkeypatch.delenv("MAMBAKIT_BACKEND", raising=False)
    monkeypatch.setattr(step_triton, "ssd_step_triton", fail)
    kw = make_case(1, 2, 4, 1, 4, seed=9)
    expected = ssd_step_reference(**with_state(kw, kw["state"].clone()))
    assert_close(ssd_step(**kw), expected, 1e-12, "y")


def test_custom_op_checks_and_traces():
    """Schema, fake impl and mutation declared right (opcheck); torch.compile traces the call into
    one graph (aot_eager: no C++ compiler needed on CPU)."""
    kw = make_case(2, 4, 5, 2, 3, seed=10)
    args = (kw["x"], kw["dt"], kw["A"], kw["B"], kw["C"], kw["state"].clone(), kw["D"], kw["z"], kw["dt_bias"],
            True, 0.0, INF)
    torch.library.opcheck(torch.ops.mambakit.ssd_step.default, args)

    def decode(state):
        return ssd_step(**with_state(kw, state), backend="triton")

    eager_state, traced_state = kw["state"].clone(), kw["state"].clone()
    eager = decode(eager_state)
    traced = torch.compile(decode, backend="aot_eager", fullgraph=True)(traced_state)
    assert_close(traced, eager, 1e-6, "y")
    assert_close(traced_state, eager_state, 1e-6, "state")


# ----------------------------------------------------------------------------------------------
# Errors, raised before any computation (the state is left as it was)
# ----------------------------------------------------------------------------------------------

BAD = [
    pytest.param(lambda kw: dict(kw, x=kw["x"][None]), ValueError, "x: expected 3 dimensions", id="x-ndim"),
    pytest.param(lambda kw: dict(kw, x=kw["x"].long()), TypeError, "x: expected dtype", id="x-dtype"),
    pytest.param(lambda kw: dict(kw, dt=kw["dt"][:, :3]), ValueError, r"dt: expected shape \(b, h\)", id="dt-shape"),
    pytest.param(lambda kw: dict(kw, dt=kw["dt"].double()), TypeError, "dt: expected dtype", id="dt-dtype"),
    pytest.param(lambda kw: dict(kw, A=kw["A"][:3]), ValueError, r"A: expected shape \(h,\)", id="A-shape"),
    pytest.param(lambda kw: dict(kw, B=kw["B"].repeat(1, 2, 1)), ValueError, "B: expected a group count", id="B-groups"),
    pytest.param(lambda kw: dict(kw, C=kw["C"][:, :, :4]), ValueError, r"C: expected shape \(b, g, n\)", id="C-n"),
    pytest.param(lambda kw: dict(kw, B=kw["B"].half()), TypeError, "B: expected dtype", id="B-dtype"),
    pytest.param(lambda kw: dict(kw, state=kw["state"][..., :4]), ValueError, r"state: expected shape \(b, h, p, n\)",
                 id="state-shape"),
    pytest.param(lambda kw: dict(kw, state=kw["state"].bfloat16()), TypeError, "state: expected dtype",
                 id="state-bf16"),
    pytest.param(lambda kw: dict(kw, D=kw["D"][:3]), ValueError, r"D: expected shape \(h,\)", id="D-shape"),
    pytest.param(lambda kw: dict(kw, z=kw["z"][..., :3]), ValueError, r"z: expected shape \(b, h, p\)", id="z-shape"),
    pytest.param(lambda kw: dict(kw, dt_bias=kw["dt_bias"][None]), ValueError, "dt_bias: expected 1 dimensions",
                 id="dt_bias-ndim"),
    pytest.param(lambda kw: dict(kw, dt_softplus=1), TypeError, "dt_softplus: expected a bool", id="softplus-int"),
    pytest.param(lambda kw: dict(kw, dt_limit=(0.5, 0.1)), ValueError, "dt_limit: expected lo <= hi", id="dt_limit"),
    pytest.param(lambda kw: dict(kw, backend="cuda"), ValueError, "backend: expected one of", id="backend-name"),
    pytest.param(lambda kw: dict(kw, x=kw["x"].double(), dt=kw["dt"].double(), B=kw["B"].double(),
                                 C=kw["C"].double(), z=kw["z"].double(), backend="triton"),
                 ValueError, "does not take float64", id="triton-float64"),
]


@pytest.mark.parametrize("bad, error, match", BAD)
def test_bad_input(bad, error, match):
    kw = make_case(2, 6, 5, 2, 8, seed=11)
    kw["state"] = kw["state"].clone()
    before = kw["state"].clone()
    with pytest.raises(error, match=match):
        ssd_step(**bad(kw))
    assert torch.equal(kw["state"], before)


def test_triton_refuses_inputs_that_need_grad():
    kw = make_case(1, 2, 3, 1, 4, seed=12)
    with pytest.raises(ValueError, match="require grad"):
        ssd_step(**dict(kw, x=kw["x"].requires_grad_()), backend="triton")


# ----------------------------------------------------------------------------------------------
# Mamba2.step against forward with a cache
# ----------------------------------------------------------------------------------------------

D_MODEL = 32
MIXERS = [
    pytest.param(dict(d_state=8, headdim=8, ngroups=2, d_ssm=48), id="groups2-dssm-mlp"),
    pytest.param(dict(d_state=8, headdim=16, rmsnorm=False, D_has_hdim=True, dt_limit=(0.01, 0.5), bias=True),
                 id="nonorm-hdimD-dtlimit"),
    pytest.param(dict(d_state=5, headdim=16, norm_before_gate=True), id="norm-before-gate-n5"),
]


def make_mixer(kwargs, dtype, d_model=D_MODEL):
    layer = Mamba2(d_model, layer_idx=0, **kwargs).to(dtype)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for param in layer.parameters():  # break init symmetries (ones, equal rows)
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype))
    return layer


def forward_then_steps(layer, u, prefill, step_backend=None, monkeypatch=None):
    """Outputs and states after each token from step(), and their definition: the output of the
    full parallel forward at that position and the final states of a cached prefill (the chunked
    path) of every token up to it."""
    with torch.no_grad():
        full = layer(u)
        expected = []
        for t in range(prefill, u.shape[1]):
            cache = InferenceCache(max_batch_size=u.shape[0], max_seqlen=u.shape[1])
            layer(u[:, : t + 1], inference_params=cache)
            expected.append((full[:, t : t + 1], *cache.states[0]))
        cache = InferenceCache(max_batch_size=u.shape[0], max_seqlen=u.shape[1])
        layer(u[:, :prefill], inference_params=cache)
        states = cache.states[0]
        if step_backend is not None:
            monkeypatch.setenv("MAMBAKIT_BACKEND", step_backend)
        got = []
        for t in range(prefill, u.shape[1]):
            out, conv_state, ssm_state = layer.step(u[:, t : t + 1], *states)
            assert conv_state is states[0] and ssm_state is states[1]
            got.append((out, conv_state.clone(), ssm_state.clone()))
    return expected, got


@pytest.mark.parametrize("kwargs", MIXERS)
def test_mamba2_step_matches_forward_with_cache(kwargs):
    layer = make_mixer(kwargs, torch.float64)
    u = torch.randn(2, 8, D_MODEL, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    expected, got = forward_then_steps(layer, u, prefill=5)
    for want, have in zip(expected, got):
        for name, a, b in zip(("out", "conv_state", "ssm_state"), have, want):
            assert_close(a, b, 1e-12, name)


@pytest.mark.parametrize("kwargs", MIXERS)
def test_mamba2_step_through_triton_kernels(kwargs, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference SSD step ran")

    layer = make_mixer(kwargs, torch.float32).to(DEVICE)
    u = torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    monkeypatch.setattr(step_module, "ssd_step_reference", fail)
    expected, got = forward_then_steps(layer, u, prefill=4, step_backend="triton", monkeypatch=monkeypatch)
    for want, have in zip(expected, got):
        for name, a, b in zip(("out", "conv_state", "ssm_state"), have, want):
            assert_close(a, b, 1e-5, name)


# ----------------------------------------------------------------------------------------------
# GPU: real sizes
# ----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("g", [1, 8])
@pytest.mark.parametrize("features", FEATURES)
def test_real_size_on_gpu(g, features):
    run_both(make_case(16, 32, 64, g, 128, dtype=torch.bfloat16, seed=16, **features), TOL[torch.bfloat16])


@gpu
@pytest.mark.gpu
def test_mamba2_step_compiles_on_gpu():
    layer = make_mixer(dict(d_state=128, headdim=64, ngroups=2), torch.float32, d_model=256).cuda()
    states = layer.allocate_inference_cache(4, 16)
    u = torch.randn(4, 1, 256, device="cuda")
    eager_states = tuple(t.clone() for t in states)
    compiled = torch.compile(layer.step, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # the second token starts from nonzero states
            eager = layer.step(u, *eager_states)[0]
            traced = compiled(u, *states)[0]
            assert_close(traced, eager, 1e-5, "out")
    for a, b in zip(states, eager_states):
        assert_close(a, b, 1e-5, "state")
