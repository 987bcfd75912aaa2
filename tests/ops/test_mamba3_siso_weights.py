"""The fused SISO Mamba-3 weights (log-decay, trapezoid input weight, skip) against the same
formulas in float64 PyTorch (the reference's trapezoid_weights), outputs and every gradient, with
and without biases and D, one and several groups, strided B/C rows (slices of one tensor, as the
layer passes them), odd lengths and lengths not divisible by the kernel's token block."""

import pytest
import torch

from tests.utils import assert_close

pytest.importorskip("triton")
from mambakit.ops.mamba3.reference import trapezoid_weights  # noqa: E402
from mambakit.ops.mamba3.siso_weights_triton import BLOCK_T, siso_weights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def formulas(dt, A, trap, B, C, B_bias, C_bias, D):
    """The three weights as mamba3_triton computed them in PyTorch before the kernel."""
    b, l, h = dt.shape
    g = B.shape[2]
    log_decay, gamma, c = trapezoid_weights(dt, A, trap)
    c_next = torch.cat([c[:, 1:], c.new_zeros(b, 1, h)], dim=1)
    Bh, Ch = (t.repeat_interleave(h // g, dim=2) for t in (B, C))  # (b, l, h, n)
    if B_bias is not None:
        Bh = Bh + B_bias
    if C_bias is not None:
        Ch = Ch + C_bias
    skip = -c_next * (Bh * Ch).sum(-1)
    if D is not None:
        skip = skip + D
    return log_decay, gamma + c_next, skip


def check(b, l, h, g, n, dtype, tol, grad_tol=None, biases=True, with_D=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)

    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen)).to(dtype).to(DEVICE)
    A = -torch.rand(b, l, h, generator=gen).add(0.5).to(dtype).to(DEVICE)
    trap = rn(b, l, h)
    rows = rn(b, l, g, 2 * n + 5, scale=0.5)
    B, C = rows[..., :n], rows[..., n + 5:]  # unit stride in n, strided rows
    B_bias = rn(h, n, scale=0.5).float() if biases else None
    C_bias = rn(h, n, scale=0.5).float() if biases else None
    D = rn(h).float() if with_D else None
    inputs = [dt, A, trap, B, C, B_bias, C_bias, D]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    got = siso_weights(*leaves, backward=True)
    exact = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    want = formulas(*exact)
    douts = [torch.randn(b, l, h, generator=gen).to(DEVICE) for _ in range(3)]
    present = [i for i, t in enumerate(inputs) if t is not None]
    grads = torch.autograd.grad(got, [leaves[i] for i in present], douts)
    grads_exact = torch.autograd.grad(want, [exact[i] for i in present], [d.double() for d in douts])
    for name, y, ye in zip(("log_decay", "weight", "skip"), got, want):
        assert y.dtype == torch.float32 and y.shape == (b, l, h)
        assert_close(y.double(), ye, tol, name)
    names = ("ddt", "dA", "dtrap", "dB", "dC", "dB_bias", "dC_bias", "dD")
    for i, gr, ge in zip(present, grads, grads_exact):
        assert gr.dtype == inputs[i].dtype
        assert_close(gr.double(), ge, tol if grad_tol is None or inputs[i].dtype == torch.float32 else grad_tol,
                     names[i])


@pytest.mark.parametrize("b,l,h,g,n", [(1, 1, 1, 1, 4), (2, 37, 3, 1, 6), (1, BLOCK_T + 1, 4, 2, 16),
                                       (2, 2 * BLOCK_T, 4, 4, 8)])
def test_matches_the_formulas_fp32(b, l, h, g, n):
    check(b, l, h, g, n, torch.float32, 1e-5)


@pytest.mark.parametrize("biases,with_D", [(False, True), (True, False), (False, False)])
def test_without_biases_or_D(biases, with_D):
    check(2, 45, 4, 2, 8, torch.float32, 1e-5, biases=biases, with_D=with_D, seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    # Inputs rounded once and every product in float32 on both sides: the weights agree to
    # float32 rounding, the gradients of half inputs to their own rounding.
    check(2, 50, 4, 1, 32, dtype, 1e-5, grad_tol=8e-3, seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_sizes_on_gpu(dtype):
    check(2, 1000, 32, 1, 128, dtype, 1e-5, grad_tol=8e-3, seed=3)
