"""The fused Mamba-3 MIMO epilogue (W_k = sum_j M_kj mimo_x_j, y = sum_k mimo_o_k silu(z mimo_z_k)
(y_core_k + x W_k)) against the same formula in float64 PyTorch: outputs and every gradient, with
and without z and mimo_o, on strided x and z (slices of one projection, as the layer passes
them), odd sizes and ranks 2, 4, 8."""

import pytest
import torch
import torch.nn.functional as F

from tests.utils import assert_close

pytest.importorskip("triton")
from mambakit.ops.mamba3 import mimo_epilogue_triton  # noqa: E402
from mambakit.ops.mamba3.mimo_epilogue_triton import mimo_epilogue  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def formula(y_core, x, M, mimo_x, z, mimo_z, mimo_o):
    """y_core (b, l, r, h, p), x and z (b, l, h, p), M (b, l, h, r, r), mimo_* (h, r, p)."""
    W = torch.einsum("blhkj,hjp->blhkp", M, mimo_x)
    out = y_core.transpose(2, 3) + x[:, :, :, None] * W  # (b, l, h, r, p)
    if z is not None:
        out = out * F.silu(z[:, :, :, None] * mimo_z)
    return out if mimo_o is None else (out * mimo_o).sum(dim=3)


def check(b, l, h, p, r, dtype, tol, gated, mixed, seed=0):
    gen = torch.Generator().manual_seed(seed)
    projection = torch.randn(b, l, h * (2 * p) + 3, generator=gen).to(dtype).to(DEVICE)
    x = projection[..., : h * p].view(b, l, h, p)  # strided tokens, dense heads
    z = projection[..., h * p + 3:].view(b, l, h, p)
    y_core = torch.randn(b, l, r, h, p, generator=gen).to(dtype).to(DEVICE)
    M = torch.randn(b, l, h, r, r, generator=gen).to(DEVICE)
    mimo = [torch.randn(h, r, p, generator=gen).to(DEVICE) for _ in range(3)]
    inputs = [y_core, x, M, mimo[0], z if gated else None, mimo[1] if gated else None, mimo[2] if mixed else None]
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    y = mimo_epilogue(*leaves, backward=True)
    shape = (b, l, h, p) if mixed else (b, l, h, r, p)
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous()
    exact = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    y_exact = formula(*exact)
    assert_close(y.double(), y_exact, tol, "y")
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    names = ("dy_core", "dx", "dM", "dmimo_x", "dz", "dmimo_z", "dmimo_o")
    present = [i for i, t in enumerate(inputs) if t is not None]
    grads = torch.autograd.grad(y, [leaves[i] for i in present], dy.to(dtype))
    grads_exact = torch.autograd.grad(y_exact, [exact[i] for i in present], dy.double())
    for i, g, ge in zip(present, grads, grads_exact):
        assert g.dtype == inputs[i].dtype, names[i]
        assert_close(g.double(), ge, tol, names[i])


@pytest.mark.parametrize("gated,mixed", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["gated-mixed", "ungated-mixed", "gated-unmixed", "ungated-unmixed"])
@pytest.mark.parametrize("b,l,h,p,r", [(1, 1, 1, 1, 2), (2, 37, 3, 6, 4), (1, 21, 2, 64, 8)])
def test_matches_the_formula_fp32(b, l, h, p, r, gated, mixed):
    check(b, l, h, p, r, torch.float32, 1e-5, gated, mixed)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    check(2, 33, 3, 16, 4, dtype, tol, True, True, seed=1)


def test_many_tokens_per_backward_program(monkeypatch):
    """Few backward programs: each walks several token blocks, the last one partly past the end."""
    monkeypatch.setattr(mimo_epilogue_triton, "TOKEN_SPLITS", 6)
    assert mimo_epilogue_triton._splits(3 * 233, 2, 16) == (3, 240)
    assert mimo_epilogue_triton._splits(0, 2, 16) == (0, 16)
    check(3, 233, 2, 4, 2, torch.float32, 1e-5, True, True, seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("r", [2, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_real_sizes_on_gpu(r, dtype, tol):
    check(4, 1000, 32, 64, r, dtype, tol, True, True, seed=3)
