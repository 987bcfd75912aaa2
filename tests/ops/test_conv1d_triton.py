"""The Triton causal conv1d and its decode step against the reference (interpreter on CPU)."""

import pytest
import torch

from mambakit.ops.conv1d import causal_conv1d, causal_conv1d_update
from tests.utils import assert_close

pytest.importorskip("triton")  # a test dependency: installed by `make test`
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
