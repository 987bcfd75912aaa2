"""Bidirectional mixer: Vim's formula for Mamba-1 restated from scratch, flip symmetry for all
three layer types, non-causality, parameter sharing and errors."""

import pytest
import torch
import torch.nn.functional as F

from mambakit.layers import BidirectionalMixer, Mamba1, Mamba2, Mamba3

LAYERS = {
    "mamba1": (Mamba1, {"d_state": 4}),
    "mamba2": (Mamba2, {"d_state": 8, "headdim": 8, "chunk_size": 4}),
    "mamba3": (Mamba3, {"d_state": 8, "headdim": 8, "chunk_size": 4}),
}


def _mamba1_branch(branch, x, z):
    """One Mamba-1 branch from its parameters, written out: causal depthwise conv + SiLU, x_proj,
    dt_proj + softplus, the recurrence token by token, D skip, SiLU(z) gate. x, z (b, l, d_inner)."""
    l = x.shape[1]
    k = branch.conv1d.weight.shape[-1]
    xc = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), branch.conv1d.weight, branch.conv1d.bias,
                  groups=x.shape[-1])
    xc = F.silu(xc).transpose(1, 2)  # (b, l, d_inner)
    dt, B, C = torch.split(branch.x_proj(xc), [branch.dt_rank, branch.d_state, branch.d_state], dim=-1)
    delta = F.softplus(branch.dt_proj(dt))  # (b, l, d_inner)
    A = -torch.exp(branch.A_log)
    h = torch.zeros(x.shape[0], x.shape[-1], branch.d_state, dtype=x.dtype)
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * xc[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + branch.D * xc[:, t])
    return torch.stack(ys, dim=1) * F.silu(z)


def test_mamba1_matches_vim_formula():
    torch.manual_seed(0)
    mixer = BidirectionalMixer(Mamba1, 8, d_state=4).double()
    hidden = torch.randn(2, 7, 8, dtype=torch.float64)
    x, z = mixer.forward_branch.in_proj(hidden).chunk(2, dim=-1)
    y_f = _mamba1_branch(mixer.forward_branch, x, z)
    # Vim's backward branch reads x and z reversed and its output is flipped back.
    y_b = _mamba1_branch(mixer.backward_branch, x.flip(1), z.flip(1)).flip(1)
    expected = mixer.forward_branch.out_proj((y_f + y_b) / 2)
    torch.testing.assert_close(mixer(hidden), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_flip_symmetry_with_tied_branches(layer):
    """With the backward branch's parameters equal to the forward branch's, reversing the input
    reverses the output."""
    cls, kwargs = LAYERS[layer]
    torch.manual_seed(1)
    mixer = BidirectionalMixer(cls, 16, **kwargs).double()
    forward_params = dict(mixer.forward_branch.named_parameters())
    with torch.no_grad():
        for name, param in mixer.backward_branch.named_parameters():
            param.copy_(forward_params[name])
    hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(mixer(hidden.flip(1)), mixer(hidden).flip(1), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_every_token_sees_the_whole_sequence_and_both_branches_learn(layer):
    cls, kwargs = LAYERS[layer]
    torch.manual_seed(2)
    mixer = BidirectionalMixer(cls, 16, **kwargs)
    hidden = torch.randn(1, 10, 16)
    changed = hidden.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(mixer(hidden)[:, 0], mixer(changed)[:, 0]), "token 0 ignored the last token"
    mixer(hidden).square().sum().backward()
    for branch in (mixer.forward_branch, mixer.backward_branch):
        grads = [p.grad for p in branch.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_projections_are_shared_not_duplicated():
    mixer = BidirectionalMixer(Mamba1, 8, d_state=4)
    keys = mixer.state_dict().keys()
    assert not any(k.startswith(("backward_branch.in_proj", "backward_branch.out_proj")) for k in keys)
    assert "backward_branch.A_log" in keys and "backward_branch.conv1d.weight" in keys
    single = Mamba1(8, d_state=4)
    shared = single.in_proj.weight.numel() + single.out_proj.weight.numel()
    assert sum(p.numel() for p in mixer.parameters()) == 2 * sum(p.numel() for p in single.parameters()) - shared


def test_errors():
    with pytest.raises(TypeError, match="layer_cls"):
        BidirectionalMixer(torch.nn.Linear, 8)
    mixer = BidirectionalMixer(Mamba1, 8, d_state=4)
    with pytest.raises(ValueError, match="inference_params"):
        mixer(torch.randn(1, 3, 8), inference_params=object())
    with pytest.raises(ValueError, match="hidden_states"):
        mixer(torch.randn(1, 3, 9))
