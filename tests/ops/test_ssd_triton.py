"""The Triton SSD against the reference: outputs, final states and every gradient.

On CPU (CI) the kernels run in Triton's interpreter on small shapes; on a GPU the same cases run
natively, plus real sizes, all dtypes and numerical stress (``pytest -m gpu``).
"""

import pytest
import torch

from mambakit.ops.ssd import ssd
from tests.utils import assert_close

pytest.importorskip("triton")  # a test dependency: installed by `make test`
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
GRAD_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_case(b, l, h, p, g, n, *, D="head", z=True, bias=True, h0=True, seq=False, dt_limit=(0.0, float("inf")),
              dtype=torch.float32, seed=0, dt_range=None, A_min=-1.0):
    """Random inputs of :func:`ssd`: raw dt ~ N(0, 0.5) through softplus, |N(0, 0.5)| without
    it, or uniform in ``dt_range`` used as is (no bias, no softplus)."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape, dt_=dtype):
        return torch.randn(*shape, generator=gen).to(dt_).to(DEVICE)

    if dt_range is None:
        # Without softplus (no bias) dt is used as drawn: keep it positive, as a time step is.
        dt = rn(b, l, h) * 0.5 if bias else (rn(b, l, h) * 0.5).abs()
    else:
        lo, hi = dt_range
        dt = (torch.rand(b, l, h, generator=gen) * (hi - lo) + lo).to(dtype).to(DEVICE)
        bias = False
    return dict(
        x=rn(b, l, h, p), dt=dt,
        A=(A_min * torch.rand(h, generator=gen)).clamp(max=-1e-2).to(DEVICE),
        B=rn(b, l, g, n), C=rn(b, l, g, n),
        D={"head": rn(h, dt_=torch.float32), "head-dim": rn(h, p, dt_=torch.float32), None: None}[D],
        z=rn(b, l, h, p) if z else None,
        dt_bias=rn(h, dt_=torch.float32) * 0.1 if bias else None, dt_softplus=bias, dt_limit=dt_limit,
        initial_states=rn(b, h, p, n, dt_=torch.float32) if h0 else None,
        seq_idx=torch.sort(torch.randint(0, 3, (b, l), generator=gen), dim=1).values.to(torch.int32).to(DEVICE)
        if seq else None,
    )


def run_both(kw, chunk_size, tol_y, tol_grad):
    grads_of = [k for k in GRAD_INPUTS if kw[k] is not None]
    results = {}
    for backend in ("reference", "triton"):
        args = {k: (v.detach().clone().requires_grad_() if k in grads_of else v) for k, v in kw.items()}
        y, final = ssd(**args, chunk_size=chunk_size, return_final_states=True, backend=backend)
        gen = torch.Generator(device=y.device).manual_seed(7)
        dy = torch.randn(y.shape, generator=gen, device=y.device).to(y.dtype)
        dfinal = torch.randn(final.shape, generator=gen, device=y.device)
        grads = torch.autograd.grad((y.float() * dy.float()).sum() + (final * dfinal).sum(),
                                    [args[k] for k in grads_of])
        results[backend] = {"y": y, "final": final, **{f"d{k}": gr for k, gr in zip(grads_of, grads)}}
    for name, ref in results["reference"].items():
        got = results["triton"][name]
        assert got.dtype == ref.dtype, name
        assert_close(got, ref, tol_y if name in ("y", "final") else tol_grad, name)


FEATURES = [
    pytest.param(dict(), id="all"),
    pytest.param(dict(D="head-dim"), id="D-per-channel"),
    pytest.param(dict(D=None, z=False, bias=False, h0=False), id="bare"),
    pytest.param(dict(seq=True), id="packed-seq_idx"),
    pytest.param(dict(dt_limit=(0.2, 1.0)), id="dt_limit"),
]


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("l", [1, 37, 64])
def test_matches_reference_fp32(features, l):
    # Chunks of 16: 37 tokens end in a partial chunk; 64 end exactly on one.
    kw = make_case(2, l, 4, 16, 2, 16, seed=l, **features)
    run_both(kw, 16, 1e-5, 1e-4)


@pytest.mark.parametrize("shape", [(1, 50, 6, 12, 3, 20), (2, 33, 2, 8, 1, 40)], ids=["g3-odd-p-n", "g1-p8-n40"])
def test_odd_sizes_and_groups(shape):
    kw = make_case(*shape, seed=sum(shape), seq=True)
    run_both(kw, 32, 1e-5, 1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
def test_half_precision_inputs(dtype, tol):
    kw = make_case(2, 40, 4, 16, 2, 16, dtype=dtype, seed=3, seq=True)
    run_both(kw, 16, tol, tol)


def test_chunk_size_is_rounded_to_a_power_of_two():
    from mambakit.ops.ssd.triton_ops import kernel_chunk

    assert [kernel_chunk(c) for c in (1, 16, 100, 256, 1000)] == [16, 16, 64, 128, 128]
    kw = make_case(1, 45, 2, 16, 1, 16, seed=9)
    run_both(kw, 20, 1e-5, 1e-4)


def test_forward_only_matches():
    kw = make_case(1, 30, 2, 16, 1, 16, seed=4)
    with torch.no_grad():
        y = ssd(**kw, chunk_size=16, backend="triton")
        ref = ssd(**kw, chunk_size=16, backend="reference")
    assert_close(y, ref, 1e-5, "y")


def test_backend_errors():
    kw = make_case(1, 8, 2, 16, 1, 16, seed=5)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ssd(**kw, backend="cuda")
    wide = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    with pytest.raises(ValueError, match="float64"):
        ssd(**wide, backend="triton")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("features", FEATURES)
def test_real_sizes_on_gpu(dtype, tol, features):
    # 1000 tokens: three full 256-token chunks and a partial one.
    kw = make_case(2, 1000, 8, 64, 2, 128, dtype=dtype, seed=11, **features)
    run_both(kw, 256, tol, 2 * tol)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("p,n", [(32, 32), (16, 32), (32, 16)])
def test_small_heads_on_gpu(dtype, tol, p, n):
    """Head and state sizes below the kernels' tiles (blocks padded to 16/32): the tile shapes where
    the GPU compiler's products differ from the real-size ones; 300 tokens, a partial 64-token chunk."""
    kw = make_case(2, 300, 8, p, 2, n, dtype=dtype, seed=14)
    run_both(kw, 64, tol, 2 * tol)


@gpu
@pytest.mark.gpu
def test_numerical_stress_long_bf16():
    # dt in [1e-4, 10], A down to -1e3, a million tokens in bf16: no inf/NaN, and the forward
    # still agrees with the fp32 reference on a prefix.
    kw = make_case(1, 1 << 20, 2, 64, 1, 64, dtype=torch.bfloat16, seed=12, dt_range=(1e-4, 10.0), A_min=-1e3)
    grads_of = [k for k in GRAD_INPUTS if kw[k] is not None]
    args = {k: (v.detach().clone().requires_grad_() if k in grads_of else v) for k, v in kw.items()}
    y, final = ssd(**args, return_final_states=True, backend="triton")
    (y.float().sum() + final.sum()).backward()
    for name, t in [("y", y), ("final", final)] + [(k, args[k].grad) for k in grads_of]:
        assert torch.isfinite(t).all(), name
    prefix = {k: (v[:, :8192] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    with torch.no_grad():
        ref = ssd(**prefix, backend="reference")
    assert_close(y[:, :8192], ref, 3e-2, "y")


@gpu
@pytest.mark.gpu
def test_compiles_without_graph_breaks():
    kw = make_case(2, 300, 4, 64, 1, 64, dtype=torch.bfloat16, seed=13)
    grads_of = [k for k in GRAD_INPUTS if kw[k] is not None]

    def loss(**args):
        y, final = ssd(**args, chunk_size=128, return_final_states=True)
        return y.float().square().sum() + final.sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager_args = {k: (v.detach().clone().requires_grad_() if k in grads_of else v) for k, v in kw.items()}
    comp_args = {k: (v.detach().clone().requires_grad_() if k in grads_of else v) for k, v in kw.items()}
    loss(**eager_args).backward()
    compiled(**comp_args).backward()
    for k in grads_of:
        assert_close(comp_args[k].grad, eager_args[k].grad, 1e-3, f"d{k}")


def test_backward_split_over_heads(monkeypatch):
    """dB and dC summed over programs when a program takes fewer than a group's heads."""
    from mambakit.ops.ssd import triton_ops

    for name in ("bwd_dx", "bwd_dc"):
        monkeypatch.setitem(triton_ops.CONFIGS, name, dict(triton_ops.CONFIGS[name], HEADS=1))
    kw = make_case(2, 37, 6, 16, 2, 16, seed=14, seq=True)
    run_both(kw, 16, 1e-5, 1e-4)


def test_strided_views_of_a_projection():
    """x, z, dt, B and C as column slices of one (b, l, width) projection, as a Mamba-2 layer
    passes them (read in place by the kernels), give the reference's outputs and gradients."""
    b, l, h, p, g, n = 2, 37, 4, 16, 2, 16
    gen = torch.Generator().manual_seed(15)
    widths = [h * p, h * p, g * n, g * n, h]
    proj = torch.randn(b, l, sum(widths), generator=gen).to(DEVICE)
    results = {}
    for backend in ("reference", "triton"):
        leaf = proj.clone().requires_grad_()
        x, z, B, C, dt = torch.split(leaf, widths, dim=-1)
        y, final = ssd(x.reshape(b, l, h, p), dt, -torch.linspace(0.5, 1.5, h, device=DEVICE),
                       B.reshape(b, l, g, n), C.reshape(b, l, g, n), chunk_size=16, D=torch.ones(h, device=DEVICE),
                       z=z.reshape(b, l, h, p), dt_bias=torch.zeros(h, device=DEVICE), dt_softplus=True,
                       return_final_states=True, backend=backend)
        (grad,) = torch.autograd.grad(y.square().sum() + final.sum(), [leaf])
        results[backend] = (y, final, grad)
    for name, got, ref in zip(("y", "final", "dproj"), results["triton"], results["reference"]):
        assert_close(got, ref, 1e-4, name)
