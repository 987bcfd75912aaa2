"""Mamba2 on the Triton backend (the interpreter on CPU): a decode token's gated norm and out_proj
as one kernel, against the two ops, and where that kernel is not taken."""

import pytest
import torch

from mambakit.layers import Mamba2
from mambakit.ops.norm.linear import MAX_FUSED_ROW_VALUES
from tests.utils import assert_close, prefill_then_steps

pytest.importorskip("triton")  # a test dependency: installed by `make test`
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")


def _layer(**kwargs):
    torch.manual_seed(0)
    options = dict(d_state=8, headdim=4, expand=2, chunk_size=8, layer_idx=0)
    return Mamba2(16, **dict(options, **kwargs)).to(DEVICE)


@pytest.mark.parametrize("kwargs", [pytest.param({}, id="default"), pytest.param(dict(ngroups=2), id="two-groups"),
                                    pytest.param(dict(bias=True), id="bias")])
def test_decode_outputs_fused_match_the_unfused_ops(kwargs, monkeypatch):
    layer = _layer(**kwargs)
    x = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    calls = []
    original = Mamba2._fused_output
    monkeypatch.setattr(Mamba2, "_fused_output", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        got, got_states = prefill_then_steps(layer, x, prefill=5)
        assert len(calls) == 6, "every one-token call fuses its norm and out_proj"
        monkeypatch.setattr(Mamba2, "_fuses_output", lambda self, y, z: False)
        expected, expected_states = prefill_then_steps(layer, x, prefill=5)
    assert_close(got, expected, 1e-5, "outputs")
    for name, a, e in zip(["conv_state", "ssm_state"], got_states, expected_states):
        assert_close(a, e, 1e-6, name)


def test_fused_output_is_not_taken_where_it_does_not_apply(monkeypatch):
    y, z = torch.empty(2, 32, device=DEVICE), torch.empty(2, 32, device=DEVICE)
    layer = _layer()
    assert not layer._fuses_output(y, z)  # grad mode on, parameters require grad
    with torch.no_grad():
        assert layer._fuses_output(y, z)
        many = MAX_FUSED_ROW_VALUES // 32 + 1  # a large batch
        assert not layer._fuses_output(torch.empty(many, 32, device=DEVICE), torch.empty(many, 32, device=DEVICE))
        assert not _layer(norm_before_gate=True)._fuses_output(y, z)
        assert not _layer(d_ssm=16)._fuses_output(y[:, :16], z[:, :16])  # an MLP half beside the SSM
        assert not _layer(rmsnorm=False)._fuses_output(y, z)
        hooked = _layer()
        hooked.out_proj.register_forward_hook(lambda *args: None)
        assert not hooked._fuses_output(y, z)
        monkeypatch.setenv("MAMBAKIT_BACKEND", "reference")
        assert not layer._fuses_output(y, z)
