"""The Triton gated RMSNorm (and plain RMSNorm through it) against the reference: outputs and the
gradients of x, z and weight (interpreter on CPU; real sizes with ``pytest -m gpu``)."""

import pytest
import torch

from mambakit.layers.norm import RMSNorm, RMSNormGated
from mambakit.ops.norm import add_norm, gated_rms_norm, rms_norm
from tests.utils import OpRecorder, assert_close, assert_raises_starting

pytest.importorskip("triton")  # a test dependency: installed by `make test`
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Relative-error tolerance per storage dtype: the math is fp32, outputs round to the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def wide_slices(shape, dtype, seed, z=True, margin=5):
    """A leaf (..., 2 d + 3 margin) and x, z (..., d): column slices of it, as z of Mamba-2 is a
    slice of the in_proj output. z is None when not wanted."""
    *lead, d = shape
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(*lead, 2 * d + 3 * margin, generator=g).to(DEVICE, dtype).requires_grad_()
    x = wide[..., margin:margin + d]
    return wide, x, (wide[..., 2 * margin + d:2 * margin + 2 * d] if z else None)


def run_both(shape, dtype=torch.float32, z=True, z_dtype=None, weight_dtype=torch.float32, seed=0, **options):
    """{backend: [y, d(leaf), dweight] (+ dz when z has its own dtype)}, the reference on float64
    copies of the same rounded inputs."""
    out = {}
    for backend in ("reference", "triton"):
        wide, x, zv = wide_slices(shape, dtype, seed, z=z)
        if z_dtype is not None:
            zv = zv.detach().to(z_dtype).requires_grad_()
        weight = (1 + 0.3 * torch.randn(shape[-1], generator=torch.Generator().manual_seed(seed + 1)))
        weight = weight.to(DEVICE, weight_dtype).requires_grad_()
        leaves = [wide, weight] + ([zv] if z_dtype is not None else [])
        if backend == "reference":
            x, weight_in = x.double(), weight.double()
            zv_in = None if zv is None else zv.double()
        else:
            weight_in, zv_in = weight, zv
        y = gated_rms_norm(x, weight_in, zv_in, backend=backend, **options)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 2)).to(DEVICE)
        grads = torch.autograd.grad((y.double() * dy.double()).sum(), leaves)
        out[backend] = [y] + list(grads)
    return out


def check(out, tol, names=("y", "dwide", "dweight", "dz")):
    for name, a, b in zip(names, out["triton"], out["reference"]):
        assert_close(a, b, tol, name)


CASES = [
    pytest.param((3, 12), dict(), id="2d-one-group"),
    pytest.param((2, 5, 12), dict(group_size=4), id="3d-groups4"),
    pytest.param((2, 5, 12), dict(group_size=3), id="3d-groups3"),
    pytest.param((2, 3, 2, 12), dict(group_size=6, eps=1e-2), id="4d-eps"),
    pytest.param((1, 7), dict(eps=0.0), id="odd-d-eps0"),
    pytest.param((12,), dict(group_size=4), id="1d"),
    # 80 rows in 3 tiles of 32 per group, 2 backward programs per group: one walks two tiles.
    pytest.param((5, 16, 256), dict(group_size=128), id="many-row-tiles"),
]


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("z", [True, False], ids=["z", "no_z"])
@pytest.mark.parametrize("shape,options", CASES)
def test_matches_reference_fp32(shape, options, z, norm_before_gate):
    out = run_both(shape, z=z, seed=len(shape), norm_before_gate=norm_before_gate, **options)
    assert out["triton"][0].dtype == torch.float32
    check(out, TOL[torch.float32])


@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype, norm_before_gate):
    out = run_both((2, 6, 24), dtype=dtype, seed=3, group_size=8, norm_before_gate=norm_before_gate)
    assert out["triton"][0].dtype == dtype and out["triton"][1].dtype == dtype
    check(out, TOL[dtype])


def test_mixed_dtypes_keep_each_gradient_in_its_input_dtype():
    out = run_both((2, 4, 16), dtype=torch.bfloat16, z_dtype=torch.float32, weight_dtype=torch.bfloat16, seed=4,
                   group_size=8)
    y, dwide, dweight, dz = out["triton"]
    assert (y.dtype, dwide.dtype, dweight.dtype, dz.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)
    check(out, TOL[torch.bfloat16])


def test_rows_that_do_not_merge_into_one_stride():
    # (b, l, h, d) sliced along l: its leading axes (b, l') do not merge, the launcher copies.
    big = torch.randn(2, 5, 3, 8, device=DEVICE)
    x, z, weight = big[:, 1:4], big[:, 2:5], torch.randn(8, device=DEVICE)
    expected = gated_rms_norm(x, weight, z, group_size=4, backend="reference")
    assert_close(gated_rms_norm(x, weight, z, group_size=4, backend="triton"), expected, 1e-5, "y")


def test_plain_rms_norm_and_modules_use_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x, z, weight = (torch.randn(*s, generator=g).to(DEVICE) for s in ((2, 3, 16), (2, 3, 16), (16,)))
    assert_close(rms_norm(x, weight, backend="triton"), rms_norm(x, weight, backend="reference"), 1e-5, "rms")
    gated, plain = RMSNormGated(16, group_size=8, norm_before_gate=False).to(DEVICE), RMSNorm(16).to(DEVICE)
    expected = gated(x, z), plain(x)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    with OpRecorder() as recorder:
        got = gated(x, z), plain(x)
    assert sum("gated_rms_norm_fwd" in str(func) for func, _ in recorder.calls) == 2
    for name, a, b in zip(("gated", "plain"), got, expected):
        assert_close(a, b, 1e-5, name)


def test_strided_inputs_are_read_in_place():
    _, x, z = wide_slices((2, 5, 12), torch.float32, seed=6)
    x, z = x.detach(), z.detach()
    weight = torch.ones(12, device=DEVICE)
    with OpRecorder() as recorder:
        gated_rms_norm(x, weight, z, group_size=4, backend="triton")
    calls = [args for func, args in recorder.calls if "gated_rms_norm_fwd" in str(func)]
    assert len(calls) == 1
    assert calls[0][0].data_ptr() == x.data_ptr() and calls[0][2].data_ptr() == z.data_ptr()
    copies = [str(func) for func, _ in recorder.calls if any(k in str(func) for k in ("clone", "copy", "contiguous"))]
    assert not copies, copies


def test_custom_op_registration():
    _, x, z = wide_slices((2, 3, 8), torch.float32, seed=7)
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.mambakit.gated_rms_norm_fwd.default, (x, weight, z, 1e-5, 4, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


X, W = torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE)

BAD = {
    # id: (call, error, message start); every one raised before a kernel launches
    "float64_on_triton": (lambda: gated_rms_norm(X.double(), W, backend="triton"), ValueError, "backend:"),
    "group_too_wide": (lambda: rms_norm(torch.ones(1, 16385 * 2, device=DEVICE), torch.ones(16385 * 2, device=DEVICE),
                                        backend="triton"), ValueError, "backend:"),
    "unknown_backend": (lambda: gated_rms_norm(X, W, backend="cuda"), ValueError, "backend:"),
    "z_shape": (lambda: gated_rms_norm(X, W, X[:1], backend="triton"), ValueError, "z:"),
    "group_not_dividing": (lambda: gated_rms_norm(X, W, group_size=3, backend="triton"), ValueError, "group_size:"),
    "weight_shape": (lambda: rms_norm(X, W[:4], backend="triton"), ValueError, "weight:"),
    "flag_not_bool": (lambda: gated_rms_norm(X, W, X, norm_before_gate=0, backend="triton"), TypeError,
                      "norm_before_gate:"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs(case):
    call, error, start = BAD[case]
    assert_raises_starting(call, error, start)


def test_float64_runs_the_reference_on_auto():
    x = X.double()
    assert gated_rms_norm(x, W, x, group_size=4).dtype == torch.float64


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_before_gate", [False, True], ids=["gate_then_norm", "norm_then_gate"])
@pytest.mark.parametrize("d,group_size", [(1536, 1536), (1536, 192), (5120, 5120), (8192, 8192)])
def test_real_sizes_on_gpu(d, group_size, norm_before_gate, dtype):
    # Mamba-2 130m (d_ssm 1536, 1 or 8 groups), 2.7b (5120) and a wide group; 2 x 1025 rows.
    out = run_both((2, 1025, d), dtype=dtype, seed=d, group_size=group_size, norm_before_gate=norm_before_gate)
    check(out, TOL[dtype])


# ----------------------------------------------------------------------------------------------
# Residual add + norm
# ----------------------------------------------------------------------------------------------

ADD_CASES = {
    # id: (x dtype, residual dtype or None, residual_in_fp32, weight dtype)
    "first_block": (torch.bfloat16, None, False, torch.bfloat16),
    "first_block_fp32_residual": (torch.bfloat16, None, True, torch.bfloat16),
    "bf16_stream": (torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    "fp32_stream_bf16_model": (torch.bfloat16, torch.float32, True, torch.bfloat16),
    "fp32_stream_fp32_weight": (torch.float16, torch.float32, True, torch.float32),
    "fp32_everything": (torch.float32, torch.float32, False, torch.float32),
}
ADD_SHAPES = [pytest.param((3, 12), id="2d"), pytest.param((2, 7, 33), id="odd-d"),
              pytest.param((4, 9, 100), id="many-row-tiles")]


def add_norm_both(shape, x_dtype, res_dtype, in_fp32, w_dtype, kind, with_residual_grad, seed=0):
    """{backend: [normed, new_residual, dx, dresidual, dweight, dbias]}: both backends on the same
    inputs and output gradients; the loss uses new_residual too when with_residual_grad."""
    out = {}
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    res0 = 3 * torch.randn(shape, generator=g)
    w0, b0 = 1 + 0.3 * torch.randn(shape[-1], generator=g), 0.3 * torch.randn(shape[-1], generator=g)
    dy, dres = torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE)
    for backend in ("reference", "triton"):
        x = x0.to(DEVICE, x_dtype).requires_grad_()
        residual = None if res_dtype is None else res0.to(DEVICE, res_dtype).requires_grad_()
        weight = w0.to(DEVICE, w_dtype).requires_grad_()
        bias = b0.to(DEVICE, w_dtype).requires_grad_() if kind == "layer" else None
        normed, new_residual = add_norm(x, residual, weight, bias, eps=1e-5, kind=kind, residual_in_fp32=in_fp32,
                                        backend=backend)
        loss = (normed.double() * dy.double()).sum()
        if with_residual_grad:
            loss = loss + (new_residual.double() * dres.double()).sum()
        leaves = [t for t in (x, residual, weight, bias) if t is not None]
        out[backend] = [normed, new_residual] + list(torch.autograd.grad(loss, leaves))
    return out


@pytest.mark.parametrize("with_residual_grad", [False, True], ids=["normed-only", "both-outputs"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("case", list(ADD_CASES), ids=list(ADD_CASES))
@pytest.mark.parametrize("shape", ADD_SHAPES)
def test_add_norm_matches_reference(shape, case, kind, with_residual_grad):
    x_dtype, res_dtype, in_fp32, w_dtype = ADD_CASES[case]
    out = add_norm_both(shape, x_dtype, res_dtype, in_fp32, w_dtype, kind, with_residual_grad, seed=len(shape))
    ref, tri = out["reference"], out["triton"]
    assert [t.dtype for t in tri] == [t.dtype for t in ref]
    # the new residual is one addition: equal up to the order of one rounding
    assert_close(tri[1], ref[1], 1e-6 if tri[1].dtype == torch.float32 else TOL[tri[1].dtype], "new_residual")
    tol = max(TOL[x_dtype], TOL[w_dtype])
    names = ["normed", "new_residual", "dx"] + (["dresidual"] if res_dtype else []) + ["dweight", "dbias"]
    for name, a, b in zip(names, tri, ref):
        if name != "new_residual":
            assert_close(a, b, tol, name)


def test_add_norm_first_block_returns_x_itself_as_the_residual():
    x = torch.randn(2, 3, 8, device=DEVICE)
    _, new_residual = add_norm(x, None, torch.ones(8, device=DEVICE), backend="triton")
    assert new_residual is x


def test_add_norm_custom_op_registration():
    x, residual = torch.randn(2, 3, 8, device=DEVICE), torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.mambakit.add_norm_fwd.default, (x, residual, weight, None, 1e-5, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_blocks_use_the_fused_add_norm(monkeypatch):
    from mambakit import MambaConfig, MambaLM

    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=32, ssm_cfg={"layer": "Mamba2", "headdim": 8,
                                                                                 "d_state": 8, "chunk_size": 4}))
    ids = torch.randint(0, 32, (1, 5))
    expected = model(ids)
    model, ids = model.to(DEVICE), ids.to(DEVICE)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    with OpRecorder() as recorder:
        got = model(ids)
    assert sum("add_norm_fwd" in str(func) for func, _ in recorder.calls) == 3  # two blocks + the final norm
    assert_close(got.cpu(), expected, 1e-4, "logits")


def test_add_norm_on_auto_is_fused_only_for_graph_capture(monkeypatch):
    """Auto runs the reference eagerly (its aten kernels cost less host time than one custom-op
    launch) and the fused kernel inside fused_add_norm_on_auto, as CUDA-graph capture does. The
    auto choice is made to resolve to Triton here, as it does for CUDA tensors."""
    import mambakit.ops.norm.api as api

    monkeypatch.delenv("MAMBAKIT_BACKEND", raising=False)
    monkeypatch.setattr(api, "resolve_backend", lambda backend, device: backend or "triton")
    x, residual, weight = (torch.randn(*s, device=DEVICE) for s in ((2, 3, 8), (2, 3, 8), (8,)))

    def fused_calls():
        with OpRecorder() as recorder:
            api.add_norm(x, residual, weight)
        return sum("add_norm_fwd" in str(func) for func, _ in recorder.calls)

    assert fused_calls() == 0
    with api.fused_add_norm_on_auto():
        assert fused_calls() == 1
        with pytest.raises(ValueError):  # the flag is restored even when the body raises
            with api.fused_add_norm_on_auto():
                raise ValueError
        assert fused_calls() == 1
    assert fused_calls() == 0


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("case", ["fp32_stream_bf16_model", "bf16_stream", "fp32_everything"])
@pytest.mark.parametrize("d", [768, 2560, 8192])
def test_add_norm_real_sizes_on_gpu(d, case, kind):
    x_dtype, res_dtype, in_fp32, w_dtype = ADD_CASES[case]
    out = add_norm_both((4, 2049, d), x_dtype, res_dtype, in_fp32, w_dtype, kind, True, seed=d)
    tol = max(TOL[x_dtype], TOL[w_dtype])
    for a, b in zip(out["triton"], out["reference"]):
        assert_close(a, b, tol, "add_norm")
