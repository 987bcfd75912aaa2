"""The Triton selective scan against the reference: outputs, final states and every gradient.

On CPU (CI) the kernels run in Triton's interpreter on small shapes; on a GPU the same cases run
natively, plus real sizes, all dtypes and numerical stress (``pytest -m gpu``).
"""

import pytest
import torch

from mambakit.ops.selective_scan import selective_scan
from tests.utils import OpRecorder, assert_close

pytest.importorskip("triton")  # a test dependency: installed by `make test`
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def make_case(b, d, l, n, *, B_kind="variable", C_kind="variable", groups=1, D=True, z=True, bias=True,
              h0=True, seq=False, dtype=torch.float32, seed=0, delta_range=(0.0, 1.0), A_min=-1.0, complex_a=False):
    """Inputs of one scan; with ``complex_a``: complex A, invariant B/C and state, interleaved
    (re, im) variable/grouped B/C of length 2l."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    L = 2 * l if complex_a else l

    def proj(kind):
        if kind == "invariant":
            return torch.complex(rn(d, n), rn(d, n)) if complex_a else rn(d, n)
        if kind == "grouped":
            return rn(b, groups, n, L).to(dtype)
        return rn(b, n, L).to(dtype)

    lo, hi = delta_range
    kw = dict(
        u=rn(b, d, l).to(dtype),
        delta=(torch.rand(b, d, l, generator=g) * (hi - lo) + lo).to(DEVICE).to(dtype),
        A=(A_min * torch.rand(d, n, generator=g)).clamp(max=-1e-3).to(DEVICE),
        B=proj(B_kind), C=proj(C_kind),
        D=rn(d) if D else None, z=rn(b, d, l).to(dtype) if z else None,
        delta_bias=(0.1 * rn(d)) if bias else None, delta_softplus=bias,
        initial_state=(torch.complex(rn(b, d, n), rn(b, d, n)) if complex_a else rn(b, d, n)) if h0 else None,
        seq_idx=torch.sort(torch.randint(0, 3, (b, l), generator=g), dim=1).values.to(torch.int32).to(DEVICE) if seq else None,
    )
    if complex_a:
        kw["A"] = torch.complex(kw["A"], 3.0 * rn(d, n))
    return kw


def run_both(kw, tol_y, tol_grad, backward=True):
    grads_of = [k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state") if kw[k] is not None]
    results = {}
    for backend in ("reference", "triton"):
        args = {k: (v.detach().clone().requires_grad_() if k in grads_of else v) for k, v in kw.items()}
        y, last = selective_scan(**args, return_final_state=True, backend=backend)
        results[backend] = {"y": y, "last": last}
        if backward:
            g = torch.Generator(device=y.device).manual_seed(7)
            dy = torch.randn(y.shape, generator=g, device=y.device).to(y.dtype)
            last_real = torch.view_as_real(last) if last.is_complex() else last
            dlast = torch.randn(last_real.shape, generator=g, device=y.device)
            grads = torch.autograd.grad((y.float() * dy.float()).sum() + (last_real * dlast).sum(),
                                        [args[k] for k in grads_of])
            results[backend].update({f"d{k}": gr for k, gr in zip(grads_of, grads)})
    for name, ref in results["reference"].items():
        got = results["triton"][name]
        assert got.dtype == ref.dtype, name
        assert_close(got, ref, tol_y if name in ("y", "last") else tol_grad, name)


FEATURES = [
    pytest.param(dict(), id="all-variable"),
    pytest.param(dict(B_kind="invariant", C_kind="invariant"), id="invariant-BC"),
    pytest.param(dict(B_kind="grouped", C_kind="variable", groups=2), id="grouped-B"),
    pytest.param(dict(B_kind="variable", C_kind="grouped", groups=3), id="grouped-C-3"),
    pytest.param(dict(D=False, z=False, bias=False, h0=False), id="bare"),
    pytest.param(dict(seq=True), id="packed-seq_idx"),
]


WHOLE = 1 << 30  # one program over the whole sequence
TILINGS = {
    # forward tile, forward channels, backward tile (= saved-state spacing), backward channels,
    # tokens per forward program, tokens per backward program, forward entry groups (warps),
    # backward pipeline stages
    "8-token-tiles-split-16-32": (8, 4, 16, 4, 32, 16, 2, 3),
    "16-token-tiles-split-32": (16, 2, 32, 8, WHOLE, 32, 4, 2),
    "one-tile": (64, 4, 64, 2, WHOLE, WHOLE, 1, 1),
}


@pytest.fixture(params=list(TILINGS))
def tiles(request, monkeypatch):
    """Cut sequences into several tilings and time splits, so that short cases cross tile, chunk
    and program boundaries (on the GPU too: the plan is replaced whatever the device)."""
    from mambakit.ops.selective_scan import triton_ops

    fl, fd, save, bd, fwd_chunk, bwd_chunk, groups, stages = TILINGS[request.param]
    tiling = triton_ops.Plan(fwd_block_l=fl, fwd_block_d=fd, fwd_warps=1, save_every=save, bwd_block_d=bd,
                             bwd_warps=1, fwd_chunk=fwd_chunk, bwd_chunk=bwd_chunk, fwd_groups=groups,
                             bwd_stages=stages)
    monkeypatch.setattr(triton_ops, "plan", lambda *shape_and_mode: tiling)
    return request.param


@pytest.mark.parametrize("features", FEATURES)
@pytest.mark.parametrize("l", [1, 7, 40])
def test_matches_reference_fp32(features, l, tiles):
    kw = make_case(2, 6, l, 5, seed=l, **features)
    run_both(kw, 1e-5, 1e-4)


COMPLEX_FEATURES = [
    pytest.param(dict(), id="complex-all-variable"),
    pytest.param(dict(B_kind="invariant", C_kind="grouped", groups=2), id="complex-invariant-B-grouped-C"),
    pytest.param(dict(B_kind="grouped", C_kind="invariant", groups=3, seq=True), id="complex-grouped-B-seq_idx"),
    pytest.param(dict(D=False, z=False, bias=False, h0=False), id="complex-bare"),
]


@pytest.mark.parametrize("features", COMPLEX_FEATURES)
def test_complex_matches_reference_fp32(features, tiles):
    # 40 tokens: several tiles and chunks, the last partial (the interpreter is slow on complex
    # scans, so one length; the real-A tests cover the short cases of the shared tiling code).
    kw = make_case(2, 6, 40, 5, seed=100, complex_a=True, **features)
    run_both(kw, 1e-5, 1e-4)


def channel_last(t):
    """The same values, memory (b, l, d): as the layers' projections give them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def channel_slice(t):
    """The same values as the second half of a (b, 2d, l) tensor's channels: time is still the
    unit stride, the batch stride is twice as wide."""
    return torch.cat([torch.zeros_like(t), t], dim=1)[:, t.shape[1]:]


def channel_major(t):
    """The same values, memory (d, b, l): as the Mamba-1 layer's (channels, b l) products give them."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("layout", ["time-rows", "channel-last", "channel-major"])
@pytest.mark.parametrize("features", [FEATURES[0], FEATURES[5]])
def test_strided_z_and_output_gradient(layout, features, tiles):
    # z and the output gradient as slices whose rows run along time are read in place (no copy),
    # and so are channel-major u, delta, z and dy (whose layout y and the gradients keep);
    # channel-last ones are copied first. All match the reference.
    kw = make_case(2, 6, 40, 5, seed=21, **features)
    b, d, l = kw["u"].shape
    to_layout = {"time-rows": channel_slice, "channel-last": channel_last, "channel-major": channel_major}[layout]
    if layout != "time-rows":
        kw.update(u=to_layout(kw["u"]), delta=to_layout(kw["delta"]))
    g = torch.Generator().manual_seed(4)
    dy = to_layout(torch.randn(b, d, l, generator=g).to(DEVICE))
    dlast = torch.randn(b, d, 5, generator=g).to(DEVICE)
    names = [k for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    results = {}
    for backend in ("reference", "triton"):
        args = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in kw.items()}
        args["z"] = to_layout(kw["z"].detach()).requires_grad_()
        assert args["z"].stride() == to_layout(kw["z"]).stride()
        with OpRecorder() as recorder:
            y, last = selective_scan(**args, return_final_state=True, backend=backend)
        if backend == "triton" and layout != "channel-last":
            copies = [str(f) for f, _ in recorder.calls if any(k in str(f) for k in ("clone", "copy", "contiguous"))]
            assert not copies, copies
        grads = torch.autograd.grad([y, last], [args[k] for k in names], [dy, dlast])
        if backend == "triton" and layout == "channel-major":
            for name, t in (("y", y), ("du", grads[0]), ("ddelta", grads[1]), ("dz", grads[6])):
                assert t.stride() == args["u"].stride(), f"{name}: {t.stride()}, not u's {args['u'].stride()}"
        results[backend] = [y, last, *grads]
    for name, got, ref in zip(["y", "last"] + ["d" + k for k in names], results["triton"], results["reference"]):
        assert_close(got, ref, 1e-5 if name in ("y", "last") else 1e-4, name)


def test_half_precision_inputs():
    kw = make_case(2, 6, 70, 4, dtype=torch.float16, seed=3)
    run_both(kw, 3e-3, 3e-3)


def test_forward_only_saves_no_states_and_matches():
    kw = make_case(1, 4, 33, 3, seed=4)
    with torch.no_grad():
        y = selective_scan(**kw, backend="triton")
        ref = selective_scan(**kw, backend="reference")
    assert_close(y, ref, 1e-5, "y")


def test_backend_choice_errors():
    kw = make_case(1, 4, 8, 3, seed=5)
    with pytest.raises(ValueError, match="backend: expected one of"):
        selective_scan(**kw, backend="cuda")
    double_kw = dict(kw, A=torch.complex(kw["A"], kw["A"]).to(torch.complex128), B=torch.randn(1, 3, 16, device=DEVICE),
                     C=torch.randn(1, 3, 16, device=DEVICE), initial_state=None)
    with pytest.raises(ValueError, match="float64/complex128"):
        selective_scan(**double_kw, backend="triton")


ALL = 1 << 30  # a chunk covering the whole sequence


@pytest.mark.parametrize("shape,save_states,fwd_chunk,bwd_chunk", [
    ((8, 2048, 4096), False, 1024, 512),  # the benchmark shapes (H100 sweeps)
    ((8, 2048, 4096), True, ALL, 512),
    ((1, 2048, 65536), False, 1024, 512),
    ((8, 1536, 2048), False, 512, 512),  # 130M- and 370M-class training steps (H200 sweep)
    ((8, 1536, 2048), True, ALL, 512),
    ((8, 2048, 2048), False, 512, ALL),
    ((8, 2048, 2048), True, ALL, ALL),
], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_gpu_plan_picks_the_sweeps_fastest_chunks(monkeypatch, shape, save_states, fwd_chunk, bwd_chunk):
    """The GPU launch plan (132 SMs) chooses, at each swept shape, the chunking that was fastest
    there (benchmarks/results/tune_selective_scan*.json, benchmarks/NOTES.md)."""
    from mambakit.ops.selective_scan import triton_ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_ops, "sm_count", lambda device_index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    chosen = triton_ops.plan(*shape, save_states=save_states)
    assert (chosen.fwd_chunk, chosen.bwd_chunk) == (fwd_chunk, bwd_chunk)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("features", FEATURES)
def test_real_sizes_on_gpu(dtype, tol, features):
    kw = make_case(2, 768, 2049, 16, dtype=dtype, seed=11, **features)  # 3 tiles, the last partial
    run_both(kw, tol, 2 * tol)


@gpu
@pytest.mark.gpu
def test_numerical_stress_long_bf16():
    # delta in [1e-4, 10], A down to -1e3, a million tokens in bf16: no inf/NaN, and the forward
    # still agrees with the fp32 reference.
    kw = make_case(1, 64, 1 << 20, 16, dtype=torch.bfloat16, seed=12, delta_range=(1e-4, 10.0), A_min=-1e3,
                   bias=False)
    args = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}
    y, last = selective_scan(**args, return_final_state=True, backend="triton")
    (y.float().sum() + last.sum()).backward()
    for name, t in [("y", y), ("last", last)] + [(k, v.grad) for k, v in args.items() if isinstance(v, torch.Tensor) and v.grad is not None]:
        assert torch.isfinite(t).all(), name
    # The output is causal: the first 8192 tokens checked against the reference on that prefix.
    prefix = {k: (v[..., :8192] if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in kw.items()}
    prefix["seq_idx"] = None
    with torch.no_grad():
        ref = selective_scan(**prefix, backend="reference")
    assert_close(y[..., :8192], ref, 2e-2, "y")


@pytest.mark.parametrize("features", FEATURES[:5])
def test_decode_step_kernel(features, monkeypatch):
    """One token without gradients goes through the one-step kernel (not the tiled scan)."""
    from mambakit.ops.selective_scan import triton_ops

    def fail(*args, **kwargs):
        raise AssertionError("the tiled scan ran for a decode step")

    kw = make_case(3, 48, 1, 5, seed=21, **features)
    with torch.no_grad():
        ref = selective_scan(**kw, return_final_state=True, backend="reference")
        monkeypatch.setattr(triton_ops, "selective_scan_fwd", fail)
        got = selective_scan(**kw, return_final_state=True, backend="triton")
    assert_close(got[0], ref[0], 1e-5, "y")
    assert_close(got[1], ref[1], 1e-5, "state")


@pytest.mark.parametrize("layout", ["contiguous", "channel-major"])
def test_custom_ops_fake_outputs_match_the_real_ones(layout):
    # torch.compile allocates outputs from the fake kernels: their strides must be the real ones
    # (for channel-major u, y and the output before the gate come back channel-major).
    import mambakit.ops.selective_scan.triton_ops  # noqa: F401 (registers the custom ops)

    kw = make_case(2, 6, 20, 4, seed=5)
    to_layout = channel_major if layout == "channel-major" else (lambda t: t)
    u, delta, z = (to_layout(kw[k]).requires_grad_() for k in ("u", "delta", "z"))
    args = (u, delta, kw["A"], kw["B"], kw["C"], kw["D"], z, kw["delta_bias"], kw["initial_state"], None, True, True)
    torch.library.opcheck(torch.ops.mambakit.selective_scan_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
