"""Mamba1 on the Triton backend (the interpreter on CPU): its channel-major path, memory
(channels, b l) as the official fused layer, against the (b, l, channels) path of
``mix_projected``, and the copies it avoids; its fused decode step; and on the reference backend,
its one-token CPU step against the unfused ops."""

import pytest
import torch

from mambakit.cache import InferenceCache
from mambakit.layers import Mamba1
from mambakit.layers.mamba1 import FUSED_STEP_MAX_BATCH
from mambakit.layers.binary import binarize_projections
from tests.utils import assert_close, prefill_then_steps

pytest.importorskip("triton")  # a test dependency: installed by `make test`
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")


def _layer(**kwargs):
    torch.manual_seed(0)
    return Mamba1(8, d_state=4, layer_idx=0, **kwargs).to(DEVICE)


def _without_channel_major(monkeypatch):
    monkeypatch.setattr(Mamba1, "_runs_channel_major", lambda self, hidden_states, resume: False)


def _output_and_grads(layer, x):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = layer(x)
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * dy).sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="default"),
                                    pytest.param(dict(bias=True, conv_bias=False, dt_rank=3, d_conv=3), id="biases")])
@pytest.mark.parametrize("batch, length", [(2, 35), (1, 20)])
def test_channel_major_path_matches_the_channel_last_path(kwargs, batch, length, monkeypatch):
    layer = _layer(**kwargs)
    assert layer._runs_channel_major(torch.empty(batch, length, 8, device=DEVICE), resume=False)
    x = torch.randn(batch, length, 8, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    fast = _output_and_grads(layer, x)
    _without_channel_major(monkeypatch)
    slow = _output_and_grads(layer, x)
    names = ["out", "dx"] + ["d" + name for name, _ in layer.named_parameters()]
    for name, got, expected in zip(names, fast, slow):
        assert_close(got, expected, 1e-5, name)


def test_channel_major_prefill_and_continuation_fill_the_cache_alike(monkeypatch):
    layer = _layer()
    x = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def chunks_then_step():
        cache = InferenceCache(2, 30)
        outs = [layer(x[:, :17], inference_params=cache)]
        cache.seqlen_offset = 17
        outs.append(layer(x[:, 17:29], inference_params=cache))  # resumes with 12 tokens: channel-major
        cache.seqlen_offset = 29
        outs.append(layer(x[:, 29:], inference_params=cache))  # one token: the decode path
        return torch.cat(outs, dim=1), [t.clone() for t in cache.states[0]]

    with torch.no_grad():
        fast, fast_states = chunks_then_step()
        _without_channel_major(monkeypatch)
        slow, slow_states = chunks_then_step()
        whole = layer(x)
    assert_close(fast, slow, 1e-5, "outputs")
    assert_close(fast, whole, 1e-4, "outputs against one forward")
    for name, got, expected in zip(["conv_state", "ssm_state"], fast_states, slow_states):
        assert_close(got, expected, 1e-5, name)


def test_channel_major_training_step_copies_only_the_in_proj_gradient(monkeypatch):
    # Forward + backward: the one (b l, d_inner)-sized copy left is the cat of dx and dz into
    # in_proj's gradient; the channel-last path makes nine.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self, numel):
            super().__init__()
            self.numel, self.ops = numel, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            first = out[0] if isinstance(out, (tuple, list)) else out
            copying = any(k in str(func) for k in ("clone", "copy", "cat", "contiguous"))
            if copying and isinstance(first, torch.Tensor) and first.numel() >= self.numel:
                self.ops.append(str(func))
            return out

    layer = _layer()
    x = torch.randn(3, 21, 8, device=DEVICE, requires_grad=True)
    counts = {}
    for path in ("channel-major", "channel-last"):
        if path == "channel-last":
            _without_channel_major(monkeypatch)
        with Copies(numel=3 * 21 * layer.d_inner) as recorder:
            layer(x).sum().backward()
        counts[path] = recorder.ops
    assert counts["channel-major"] == ["aten.cat.default"], counts["channel-major"]
    assert len(counts["channel-last"]) >= 6, counts["channel-last"]


def test_channel_major_path_is_not_taken_where_it_does_not_apply(monkeypatch):
    x = torch.empty(2, 5, 8, device=DEVICE)
    assert not _layer()._runs_channel_major(x[:, :1], resume=True)  # a decode step
    assert _layer()._runs_channel_major(x[:, :1], resume=False)  # a one-token prompt
    assert not _layer(inner_norms=True)._runs_channel_major(x, resume=False)
    binary = _layer()
    assert binarize_projections(binary) == ["in_proj", "out_proj"]
    assert not binary._runs_channel_major(x, resume=False)
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    assert not _layer()._runs_channel_major(x, resume=False)


@pytest.mark.parametrize("projection", ["in_proj", "x_proj", "out_proj"])
def test_forward_hooks_on_a_projection_fire_in_training_and_in_decoding(projection):
    """The channel-major path and the fused step multiply weights directly; with a hook on a
    projection they step aside, so the hook sees every call."""
    layer = _layer()
    seen = []
    getattr(layer, projection).register_forward_hook(lambda module, args, out: seen.append(out.shape))
    x = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    layer(x).sum().backward()
    assert len(seen) == 1, "one call for the whole sequence"
    with torch.no_grad():
        prefill_then_steps(layer, x, prefill=7)
    assert len(seen) == 1 + 1 + 2, "the prompt, then one call per decode token"


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="default"),
                                    pytest.param(dict(conv_bias=False, dt_rank=3, d_conv=2), id="no-conv-bias")])
def test_decode_steps_fused_match_the_unfused_ops(kwargs, monkeypatch):
    x = torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    _assert_steps_match_the_unfused_ops(_layer(**kwargs), x, "_fused_step", "_steps_fused", monkeypatch)


def _assert_steps_match_the_unfused_ops(layer, x, step: str, gate: str, monkeypatch):
    """Prefill 7 tokens, then one-token calls: each must take Mamba1.<step>, and the outputs and
    states must equal those of the unfused ops (Mamba1.<gate> answering False)."""
    calls = []
    original = getattr(Mamba1, step)
    monkeypatch.setattr(Mamba1, step, lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        got, got_states = prefill_then_steps(layer, x, prefill=7)
        assert len(calls) == x.shape[1] - 7, f"every one-token call takes {step}"
        monkeypatch.setattr(Mamba1, gate, lambda self, *args: False)
        expected, expected_states = prefill_then_steps(layer, x, prefill=7)
    assert_close(got, expected, 1e-5, "outputs")
    for name, a, e in zip(["conv_state", "ssm_state"], got_states, expected_states):
        assert_close(a, e, 1e-5, name)


def test_fused_step_is_not_taken_where_it_does_not_apply(monkeypatch):
    projected = torch.empty(2, 2 * 16, device=DEVICE)
    layer = _layer()
    assert not layer._steps_fused(projected)  # grad mode on, parameters require grad
    with torch.no_grad():
        assert layer._steps_fused(projected)
        assert not _layer(inner_norms=True)._steps_fused(projected)
        assert not layer._steps_fused(torch.empty(FUSED_STEP_MAX_BATCH + 1, 2 * 16, device=DEVICE))  # large batch
        monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
        assert not layer._steps_fused(projected)


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="default"),
                                    pytest.param(dict(conv_bias=False, dt_rank=3, d_conv=2), id="no-conv-bias")])
def test_cpu_decode_steps_match_the_unfused_ops(kwargs, monkeypatch):
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    torch.manual_seed(0)
    layer = Mamba1(8, d_state=4, layer_idx=0, **kwargs)
    x = torch.randn(3, 12, 8, generator=torch.Generator().manual_seed(5))
    _assert_steps_match_the_unfused_ops(layer, x, "_cpu_step", "_steps_on_cpu", monkeypatch)


def test_cpu_step_is_not_taken_where_it_does_not_apply(monkeypatch):
    monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
    torch.manual_seed(0)
    layer = Mamba1(8, d_state=4, layer_idx=0)
    projected = torch.empty(2, 2 * 16)
    states = layer.allocate_inference_cache(2, 4)
    assert not layer._steps_on_cpu(projected, states)  # grad mode on, parameters require grad
    with torch.no_grad():
        assert layer._steps_on_cpu(projected, states)
        assert not Mamba1(8, d_state=4, layer_idx=0, inner_norms=True)._steps_on_cpu(projected, states)
        assert not layer._steps_on_cpu(projected.to(torch.float64), states)
        monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
        assert not layer._steps_on_cpu(projected, states)
