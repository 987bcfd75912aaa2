"""benchmarks/common.py: timing from CUDA graphs."""

import pytest
import torch

from benchmarks.common import graph_ms

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_graph_timing_of_a_backward_leaves_one_backwards_gradients():
    """A forward + backward replayed from a graph writes the gradients anew each replay (they were
    cleared before the capture), so after the timing they equal one eager backward's."""
    torch.manual_seed(0)
    weight = torch.randn(256, 256, device="cuda", requires_grad=True)
    x = torch.randn(64, 256, device="cuda")

    def step():
        (x @ weight).square().sum().backward()

    step()
    expected = weight.grad.clone()
    ms = graph_ms(step, grads=[weight], warmup_ms=5, rep_ms=20)
    assert ms is not None and ms > 0
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
def test_graph_timing_reports_a_failed_capture_as_none(capsys):
    """A call that synchronises with the host cannot be captured: None and a printed reason, and
    the device stays usable."""
    x = torch.ones(4, device="cuda")
    assert graph_ms(lambda: x.sum().item(), warmup_ms=5, rep_ms=20) is None
    assert "capture failed" in capsys.readouterr().out
    assert (x + 1).sum().item() == 8.0
