"""The fused Mamba-3 SISO epilogue (y_core + s x) * silu(z) against the same formula in float64
PyTorch, outputs and gradients, on strided x and z (slices of one projection, as the layer passes
them) and without z."""

import pytest
import torch
import torch.nn.functional as F

from tests.utils import assert_close

pytest.importorskip("triton")
from mambakit.ops.mamba3.skip_gate_triton import skip_gate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check(b, l, h, p, dtype, tol, gated, seed=0):
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(b, l, h, 2 * p + 3, generator=gen).to(dtype).to(DEVICE)
    x, z = projection[..., :p], projection[..., p + 3:]  # unit stride in p, strided rows
    y_core = torch.randn(b, l, h, p, generator=gen).to(dtype).to(DEVICE)
    s = torch.randn(b, l, h, generator=gen).to(DEVICE)
    leaves = [t.detach().clone().requires_grad_() for t in (y_core, x, s, z)]
    y = skip_gate(leaves[0], leaves[1], leaves[2], leaves[3] if gated else None, backward=True)
    assert y.dtype == dtype and y.shape == (b, l, h, p)
    exact = [t.detach().double().requires_grad_() for t in (y_core, x, s, z)]
    y_exact = exact[0] + exact[2][..., None] * exact[1]
    if gated:
        y_exact = y_exact * F.silu(exact[3])
    dy = torch.randn(b, l, h, p, generator=gen).to(DEVICE)
    grads = torch.autograd.grad(y, leaves[:3] + leaves[3:] * gated, dy.to(dtype))
    grads_exact = torch.autograd.grad(y_exact, exact[:3] + exact[3:] * gated, dy.double())
    assert_close(y.double(), y_exact, tol, "y")
    for name, g, ge in zip(("dy_core", "dx", "ds", "dz"), grads, grads_exact):
        assert_close(g.double(), ge, tol, name)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("b,l,h,p", [(1, 1, 1, 1), (2, 37, 3, 6), (1, 40, 2, 64)])
def test_matches_the_formula_fp32(b, l, h, p, gated):
    check(b, l, h, p, torch.float32, 1e-6, gated)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision(dtype, tol):
    check(2, 33, 3, 16, dtype, tol, True, seed=1)
