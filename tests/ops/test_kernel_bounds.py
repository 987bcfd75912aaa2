"""The bounds check (tests/triton_bounds.py, around every interpreted kernel of the suite through
tests/conftest.py) catches an overrun; and the kernels of whole tiny models on the Triton backend
(which CPU tests otherwise reach only op by op) stay inside their tensor arguments' memory, also
with the GPU's tiling of the conv1d and norm backward kernels (programs per SM), which the
interpreter otherwise shrinks."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from tests.triton_bounds import OutOfBounds, bounds_checked  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the kernels as Triton's interpreter runs them")


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if MASKED:
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
    else:
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))


def test_the_check_catches_an_unmasked_read_past_the_end():
    x, y = torch.randn(10), torch.empty(10)
    with bounds_checked():
        copy_kernel[(1,)](x, y, 10, BLOCK=16, MASKED=True)
        with pytest.raises(Exception, match="copy_kernel: load of 6 of 16 elements") as caught:
            copy_kernel[(1,)](x, y, 10, BLOCK=16, MASKED=False)
    assert isinstance(caught.value, OutOfBounds) or isinstance(caught.value.__cause__, OutOfBounds)
    assert torch.equal(y, x)


@pytest.mark.parametrize("gpu_tiling", [False, True], ids=["interpreter-tiling", "gpu-tiling"])
@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "mamba2-g2", "mamba3", "mamba3-mimo"])
def test_tiny_model_forward_and_backward_stay_in_bounds(monkeypatch, kind, gpu_tiling):
    from mambakit.ops.conv1d import triton_ops as conv_ops
    from mambakit.ops.norm import triton_ops as norm_ops
    from tests.fixtures import tiny_model

    if gpu_tiling:
        for module in (conv_ops, norm_ops):
            monkeypatch.setattr(module, "interpreting", lambda: False)
            monkeypatch.setattr(module, "sm_count", lambda device_index: 132)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    model = tiny_model(kind, dtype=torch.float32).train()
    tokens = torch.randint(0, 61, (2, 21))
    with bounds_checked():
        model(tokens).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
