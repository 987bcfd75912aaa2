"""The Triton causal conv1d and its decode step against the reference (interpreter on CPU)."""

import pytest
import torch

from mambakit.ops.conv1d import causal_conv1d, causal_conv1d_update
from tests.utils import OpRecorder, assert_close

pytest.importorskip("triton")  # a test dependency: installed by `make test`
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def make(b, d, l, w, seed, bias=True, init=True, seq=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        x=torch.randn(b, d, l, generator=g).to(DEVICE, dtype),
        weight=torch.randn(d, w, generator=g).to(DEVICE),
        bias=torch.randn(d, generator=g).to(DEVICE) if bias else None,
        initial_state=torch.randn(b, d, w - 1, generator=g).to(DEVICE, dtype) if init else None,
        seq_idx=torch.sort(torch.randint(0, 3, (b, l), generator=g), dim=1).values.to(DEVICE, torch.int32) if seq else None,
    )
    return kw


CASES = [
    pytest.param(dict(), id="bias-init"),
    pytest.param(dict(bias=False, init=False), id="bare"),
    pytest.param(dict(seq=True), id="packed"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("l", [1, 3, 150])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_forward_backward_and_final_state(case, w, l, activation):
    kw = make(2, 5, l, w, seed=l * 10 + w, **case)
    names = [k for k in ("x", "weight", "bias", "initial_state") if kw[k] is not None]
    out = {}
    for backend in ("reference", "triton"):
        args = {k: (v.clone().requires_grad_() if k in names else v) for k, v in kw.items()}
        y, final = causal_conv1d(**args, activation=activation, return_final_state=True, backend=backend)
        g = torch.Generator().manual_seed(1)
        dy, dfinal = torch.randn(y.shape, generator=g).to(DEVICE), torch.randn(final.shape, generator=g).to(DEVICE)
        grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), [args[k] for k in names])
        out[backend] = [y, final] + list(grads)
    for name, a, b in zip(["y", "final"] + ["d" + k for k in names], out["triton"], out["reference"]):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("w", [1, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_kernel_steps_through_a_sequence(w, activation):
    kw = make(2, 40, 6, w, seed=w)
    expected = causal_conv1d(kw["x"], kw["weight"], kw["bias"], activation=activation, initial_state=kw["initial_state"],
                             backend="reference")
    state = kw["initial_state"].clone()
    ys = [causal_conv1d_update(kw["x"][..., t], state, kw["weight"], kw["bias"], activation=activation, backend="triton")
          for t in range(6)]
    assert_close(torch.stack(ys, -1), expected, 1e-5, "steps")
    assert_close(state, kw["x"][..., 6 - (w - 1):], 0.0, "state")


# ----------------------------------------------------------------------------------------------
# Channel-last layout: x (b, d, l) a view of (b, l, D) memory, as Mamba2 passes xBC.transpose(1, 2)
# ----------------------------------------------------------------------------------------------


def channel_last_view(b, d, l, dtype, seed, margin=3):
    """A leaf (b, l, d + 2 margin) and its view x (b, d, l) on columns [margin, margin + d)."""
    wide = torch.randn(b, l, d + 2 * margin, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    wide.requires_grad_()
    return wide, wide[..., margin:margin + d].transpose(1, 2)


def run_channel_last(b, d, l, w, activation, seed, dtype=torch.float32, **case):
    """Triton on the channel-last view vs the reference on a contiguous copy: [y, final, grads...]
    of each, grads taken at the wide leaf, weight, bias and initial state."""
    kw = make(b, d, l, w, seed=seed, dtype=dtype, **case)
    names = [k for k in ("weight", "bias", "initial_state") if kw[k] is not None]
    out = {}
    for backend in ("reference", "triton"):
        wide, x = channel_last_view(b, d, l, dtype, seed)
        if backend == "reference":
            x = x.contiguous()
        args = {k: (v.clone().requires_grad_() if k in names else v) for k, v in kw.items() if k != "x"}
        y, final = causal_conv1d(x, **args, activation=activation, return_final_state=True, backend=backend)
        if backend == "triton":
            assert y.stride(1) == 1 and y.transpose(1, 2).is_contiguous(), "y: not dense channel-last"
        g = torch.Generator().manual_seed(1)
        dy, dfinal = torch.randn(y.shape, generator=g).to(DEVICE), torch.randn(final.shape, generator=g).to(DEVICE)
        # The gradient of y arrives channel-last, as from the ops that read the (b, l, d) split.
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)
        grads = torch.autograd.grad((y.float() * dy).sum() + (final.float() * dfinal).sum(),
                                    [wide] + [args[k] for k in names])
        out[backend] = [y, final] + list(grads)
    return out, ["y", "final", "dwide"] + ["d" + k for k in names]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("l", [1, 3, 150])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_channel_last_forward_backward_and_final_state(case, w, l, activation):
    out, names = run_channel_last(2, 5, l, w, activation, seed=l * 10 + w + 1, **case)
    for name, a, b in zip(names, out["triton"], out["reference"]):
        assert_close(a, b, 1e-5, name)


def test_channel_last_several_channel_blocks():
    out, names = run_channel_last(1, 130, 40, 4, "silu", seed=3, seq=True)
    for name, a, b in zip(names, out["triton"], out["reference"]):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("channel_last", [False, True], ids=["time_contiguous", "channel_last"])
def test_packed_ids_that_repeat_and_do_not_start_at_zero(channel_last):
    # A new sequence wherever the id changes: 7 7 | 2 2 2 | 7 7 ... is three sequences.
    kw = make(2, 6, 40, 4, seed=8, seq=True)
    kw["seq_idx"] = torch.tensor([7, 7, 2, 2, 2] * 8, device=DEVICE).repeat(2, 1)
    kw["seq_idx"][1, 20:] = 9
    if channel_last:
        kw["x"] = kw["x"].transpose(1, 2).contiguous().transpose(1, 2)
    names = ["x", "weight", "bias", "initial_state"]
    out = {}
    for backend in ("reference", "triton"):
        args = {k: (v.clone().requires_grad_() if k in names else v) for k, v in kw.items()}
        y, final = causal_conv1d(**args, activation="silu", return_final_state=True, backend=backend)
        grads = torch.autograd.grad((y * y).sum() + final.sum(), [args[k] for k in names])
        out[backend] = [y, final] + list(grads)
    for name, a, b in zip(["y", "final"] + ["d" + k for k in names], out["triton"], out["reference"]):
        assert_close(a, b, 1e-5, name)


def test_channel_last_input_is_read_in_place():
    kw = make(2, 6, 9, 4, seed=4)
    _, x = channel_last_view(2, 6, 9, torch.float32, seed=4)
    x = x.detach()
    with OpRecorder() as recorder:
        causal_conv1d(x, kw["weight"], kw["bias"], activation="silu", backend="triton")
    conv_calls = [args for func, args in recorder.calls if "causal_conv1d_fwd" in str(func)]
    assert len(conv_calls) == 1 and conv_calls[0][0].data_ptr() == x.data_ptr()
    copies = [str(func) for func, _ in recorder.calls if any(k in str(func) for k in ("clone", "copy", "contiguous"))]
    assert not copies, copies


# Channel-major layout: x (b, d, l) a view of the first d rows of a (D, b l) product, as the
# Mamba-1 layer computes in_proj (time the unit stride, the channel stride widest).


def channel_major_view(b, d, l, dtype, seed, extra=3):
    """A leaf (d + extra, b l) and its view x (b, d, l) on its first d rows."""
    wide = torch.randn(d + extra, b * l, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    wide.requires_grad_()
    return wide, wide[:d].view(d, b, l).transpose(0, 1)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("w", [2, 4])
@pytest.mark.parametrize("l", [3, 40])
def test_channel_major_input_keeps_its_layout(case, w, l):
    kw = make(3, 5, l, w, seed=l + w, **case)
    names = [k for k in ("weight", "bias", "initial_state") if kw[k] is not None]
    out = {}
    for backend in ("reference", "triton"):
        wide, x = channel_major_view(3, 5, l, torch.float32, seed=l + w)
        args = {k: (v.clone().requires_grad_() if k in names else v) for k, v in kw.items() if k != "x"}
        with OpRecorder() as recorder:
            y, final = causal_conv1d(x, **args, activation="silu", return_final_state=True, backend=backend)
        g = torch.Generator().manual_seed(2)
        dy = torch.randn(y.shape, generator=g).to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
        dfinal = torch.randn(final.shape, generator=g).to(DEVICE)
        if backend == "triton":
            copies = [str(f) for f, a in recorder.calls if any(k in str(f) for k in ("clone", "copy", "contiguous"))
                      and a[0].numel() == x.numel()]  # (seq_idx's conversions are not x's)
            assert not copies, copies
            assert y.transpose(0, 1).is_contiguous(), f"y: strides {y.stride()}, not channel-major"
            (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)  # the kernel's own, without the state's
            assert dx.transpose(0, 1).is_contiguous(), f"dx: strides {dx.stride()}, not channel-major"
        grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), [wide] + [args[k] for k in names])
        out[backend] = [y, final] + list(grads)
    for name, a, b in zip(["y", "final", "dwide"] + ["d" + k for k in names], out["triton"], out["reference"]):
        assert_close(a, b, 1e-5, name)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", CASES)
def test_real_sizes_on_gpu(dtype, tol, case):
    # Mamba-2 130m's xBC: d_ssm 1536 + 2 g n 256 channels, 2049 tokens (a partial last tile).
    out, names = run_channel_last(2, 1792, 2049, 4, "silu", seed=5, dtype=dtype, **case)
    for name, a, b in zip(names, out["triton"], out["reference"]):
        assert_close(a, b, tol, f"channel-last {name}")
    kw = make(2, 1792, 2049, 4, seed=6, dtype=dtype, **case)
    expected, got = (causal_conv1d(**kw, activation="silu", backend=backend) for backend in ("reference", "triton"))
    assert_close(got, expected, tol, "time-contiguous y")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("w", [4, 5], ids=["w4-preloaded-shifts", "w5-loaded-per-use"])
def test_backward_programs_of_several_time_tiles(case, w):
    # 300 tokens: three 128-token time tiles, walked two per backward program under the
    # interpreter, so one program sums two tiles' weight gradients and a second adds its own.
    # Widths up to 4 share 2 w - 1 preloaded shifted tiles of x; wider filters load per use.
    kw = make(2, 20, 300, w, seed=11, **case)
    names = [k for k in ("x", "weight", "bias", "initial_state") if kw[k] is not None]
    out = {}
    for backend in ("reference", "triton"):
        args = {k: (v.clone().requires_grad_() if k in names else v) for k, v in kw.items()}
        y = causal_conv1d(**args, activation="silu", backend=backend)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        out[backend] = torch.autograd.grad((y * dy).sum(), [args[k] for k in names])
    for name, a, b in zip(["d" + k for k in names], out["triton"], out["reference"]):
        assert_close(a, b, 1e-5, name)


@pytest.mark.parametrize("layout", ["contiguous", "channel-last", "channel-major"])
def test_custom_op_fake_output_matches_the_real_one(layout):
    # torch.compile allocates outputs from the fake kernels: their strides must be the real ones.
    kw = make(2, 5, 12, 4, seed=9)
    x = {"contiguous": kw["x"], "channel-last": kw["x"].transpose(1, 2).contiguous().transpose(1, 2),
         "channel-major": kw["x"].transpose(0, 1).contiguous().transpose(0, 1)}[layout].requires_grad_()
    from mambakit.ops.conv1d.triton_ops import causal_conv1d_fwd

    torch.library.opcheck(causal_conv1d_fwd, (x, kw["weight"], kw["bias"], kw["initial_state"], None, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
