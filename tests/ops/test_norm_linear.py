"""The fused gated RMSNorm + projection (Mamba-2's decode output path) against the two ops it
replaces, computed in float64 (interpreter on CPU; real sizes with ``pytest -m gpu``)."""

import pytest
import torch
import torch.nn.functional as F

from mambakit.ops.norm import gated_rms_norm_linear, gated_rms_norm_linear_reference
from mambakit.ops.norm.linear import MAX_FUSED_GROUP_SIZE, MAX_FUSED_ROW_VALUES
from tests.utils import assert_close, assert_raises_starting

pytest.importorskip("triton")  # a test dependency: installed by `make test`
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Relative error against float64: the normed values round to the dtype before the product.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def inputs(rows, d, n_out, dtype, seed, bias=False, row_stride_margin=3):
    """x and z as column slices of one (rows, 2 d + margin) tensor (as Mamba-2's gate is a slice of
    in_proj's output), a norm weight around 1 and a projection (n_out, d)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, 2 * d + row_stride_margin, generator=g).to(DEVICE, dtype)
    x, z = wide[:, :d], wide[:, d + row_stride_margin:]
    norm_weight = (1 + 0.3 * torch.randn(d, generator=g)).to(DEVICE, dtype)
    weight = (torch.randn(n_out, d, generator=g) / d ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n_out, generator=g).to(DEVICE, dtype) if bias else None
    return x, z, norm_weight, weight, b


def float64_expected(x, z, norm_weight, weight, bias, eps, group_size):
    """The unfused ops on float64 copies, with the normed values rounded to x's dtype in between
    (as the unfused norm stores them)."""
    rows, d = x.shape
    gs = group_size or d
    s = (x.double() * F.silu(z.double())).view(rows, d // gs, gs)
    normed = (s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)).view(rows, d) * norm_weight.double()
    normed = normed.to(x.dtype).double()
    return F.linear(normed, weight.double(), None if bias is None else bias.double())


CASES = [
    # id: rows, d, n_out, group_size, bias, eps
    pytest.param(1, 24, 10, None, False, 1e-5, id="one-row-one-group"),
    pytest.param(3, 24, 9, 8, True, 1e-5, id="groups-bias-odd-n"),
    pytest.param(6, 20, 7, 5, False, 1e-2, id="two-row-blocks-group5"),  # rows past ROWS_PER_PROGRAM
    pytest.param(9, 33, 5, None, True, 0.0, id="odd-d-eps0"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,d,n_out,group_size,bias,eps", CASES)
def test_matches_float64_unfused_ops(rows, d, n_out, group_size, bias, eps, dtype):
    x, z, nw, w, b = inputs(rows, d, n_out, dtype, seed=rows * 100 + d, bias=bias)
    out = gated_rms_norm_linear(x, z, nw, w, b, eps=eps, group_size=group_size, backend="triton")
    assert out.dtype == dtype and out.shape == (rows, n_out)
    assert_close(out, float64_expected(x, z, nw, w, b, eps, group_size), TOL[dtype], "out")


def test_reference_is_the_two_ops():
    x, z, nw, w, b = inputs(4, 16, 6, torch.float32, seed=3, bias=True)
    ref = gated_rms_norm_linear_reference(x.double(), z.double(), nw.double(), w.double(), b.double(), group_size=4)
    assert_close(ref, float64_expected(x.double(), z.double(), nw.double(), w.double(), b.double(), 1e-5, 4),
                 1e-12, "reference")


def test_auto_with_autograd_runs_the_unfused_ops_and_has_gradients():
    x, z, nw, w, _ = inputs(2, 16, 5, torch.float32, seed=4)
    w.requires_grad_()
    out = gated_rms_norm_linear(x, z, nw, w, group_size=8)
    (grad,) = torch.autograd.grad(out.sum(), w)
    x64, z64, nw64, w64 = (t.detach().double().requires_grad_(t is w) for t in (x, z, nw, w))
    (expected,) = torch.autograd.grad(float64_expected(x64, z64, nw64, w64, None, 1e-5, 8).sum(), w64)
    assert_close(grad, expected, 1e-5, "dweight")


def test_custom_op_registration():
    x, z, nw, w, b = inputs(2, 16, 6, torch.float32, seed=5, bias=True)
    torch.library.opcheck(torch.ops.mambakit.gated_rms_norm_linear.default, (x, z, nw, w, b, 1e-5, 8),
                          test_utils=("test_schema", "test_faketensor"))


X, Z, NW, WEIGHT = (torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE),
                    torch.randn(3, 8, device=DEVICE))
BAD = {
    # id: (call, error, message start); every one raised before a kernel launches
    "x_not_2d": (lambda: gated_rms_norm_linear(X[None], Z[None], NW, WEIGHT), ValueError, "x:"),
    "z_shape": (lambda: gated_rms_norm_linear(X, Z[:1], NW, WEIGHT), ValueError, "z:"),
    "weight_width": (lambda: gated_rms_norm_linear(X, Z, NW, WEIGHT[:, :4]), ValueError, "weight:"),
    "weight_dtype": (lambda: gated_rms_norm_linear(X, Z, NW, WEIGHT.half()), TypeError, "weight:"),
    "z_dtype": (lambda: gated_rms_norm_linear(X, Z.half(), NW, WEIGHT), TypeError, "z:"),
    "bias_shape": (lambda: gated_rms_norm_linear(X, Z, NW, WEIGHT, torch.zeros(4, device=DEVICE)), ValueError,
                   "bias:"),
    "group_not_dividing": (lambda: gated_rms_norm_linear(X, Z, NW, WEIGHT, group_size=3), ValueError, "group_size:"),
    "too_many_rows_on_triton": (lambda: gated_rms_norm_linear(
        torch.randn(MAX_FUSED_ROW_VALUES // 8 + 1, 8, device=DEVICE),
        torch.randn(MAX_FUSED_ROW_VALUES // 8 + 1, 8, device=DEVICE), NW, WEIGHT, backend="triton"),
        ValueError, "backend:"),
    "group_too_wide_on_triton": (lambda: gated_rms_norm_linear(  # one row, within the value limit
        torch.randn(1, MAX_FUSED_ROW_VALUES, device=DEVICE), torch.randn(1, MAX_FUSED_ROW_VALUES, device=DEVICE),
        torch.ones(MAX_FUSED_ROW_VALUES, device=DEVICE), torch.randn(2, MAX_FUSED_ROW_VALUES, device=DEVICE),
        backend="triton"), ValueError, "backend: the fused Triton norm + projection does not take groups"),
    "grad_on_triton": (lambda: gated_rms_norm_linear(X, Z, NW, WEIGHT.clone().requires_grad_(), backend="triton"),
                       ValueError, "backend:"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_inputs(case):
    call, error, start = BAD[case]
    assert_raises_starting(call, error, start)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,d,n_out,group_size", [(1, 1536, 768, None), (5, 1536, 768, 192), (1, 4096, 2048, None),
                                                     (2, 4096, 2048, None), (1, 5120, 2560, 1280), (1, 8192, 4096, 4096)])
def test_real_sizes_on_gpu(rows, d, n_out, group_size, dtype):
    # Mamba-2 130m (d_ssm 1536 with 1 or 8 groups), 1.3b (4096), 2.7b with 4 groups, two wide groups.
    x, z, nw, w, b = inputs(rows, d, n_out, dtype, seed=d + rows, bias=rows == 5)
    out = gated_rms_norm_linear(x, z, nw, w, b, group_size=group_size, backend="triton")
    assert_close(out, float64_expected(x, z, nw, w, b, 1e-5, group_size), TOL[dtype], "out")
