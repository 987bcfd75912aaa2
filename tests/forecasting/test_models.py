import pytest
import torch

from mambakit.forecasting import ForecastConfig, run_forecast
from mambakit.forecasting.blocks import (
    PATCH_PADDINGS,
    BiMambaLayer,
    MambaPlus,
    MultiScaleMamba,
    RevIN,
    patch_count,
    patchify,
    sra_decider,
)
from mambakit.forecasting.data import ett_splits, read_csv
from mambakit.forecasting.models import MODELS, build_model
from mambakit.layers import Mamba1
from mambakit.ops.conv1d import causal_conv1d

from .conftest import BORDERS

SMALL = {
    "s-mamba": dict(d_model=32, d_state=4, d_ff=32, n_layers=1),
    "bi-mamba+": dict(d_model=16, d_state=4, d_ff=32, patch_len=8, stride=4, dropout=0.0),
    "ms-mamba": dict(d_model=32, d_state=4, d_ff=32, n_layers=1, scales=(1.0, 4.0)),
    "sor-mamba": dict(d_model=32, d_state=4, d_ff=32, n_layers=1),
    "mambats": dict(d_model=16, d_state=4, d_ff=32, n_layers=1, patch_len=8, stride=4, anneal_steps=500),
    "spectromamba": dict(d_model=32, d_state=4, d_ff=32, n_layers=1),
    "attention-mamba": dict(d_model=32, d_state=4, d_ff=32, n_layers=1),
    "mamba-probtsf": dict(d_model=32, d_state=4, d_ff=32, n_layers=1),
    "dlinear": dict(),
    "lstm": dict(hidden=32, n_layers=1),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("n_vars, lookback, horizon", [(3, 48, 24), (1, 17, 5)], ids=["3x48->24", "1x17->5"])
def test_shapes(name, n_vars, lookback, horizon):
    g = torch.Generator().manual_seed(hash((name, n_vars)) % 1000)
    overrides = dict(SMALL[name])
    if name == "bi-mamba+":
        overrides.update(patch_len=4, stride=2)
    model = build_model(name, n_vars, lookback, horizon, **overrides)
    x = torch.randn(2, lookback, n_vars, generator=g)
    x_time = torch.rand(2, lookback, 4, generator=g) - 0.5
    y = model(x, x_time)
    assert y.shape == (2, horizon, n_vars) and torch.isfinite(y).all()
    if hasattr(model, "training_loss"):  # its own objective, which also trains the variance network
        model.training_loss(x, x_time, torch.randn(2, horizon, n_vars, generator=g)).backward()
    else:
        y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(MODELS))
def test_rejects_bad_inputs(name):
    model = build_model(name, 3, 24, 8, **SMALL[name])
    with pytest.raises(TypeError, match="x"):
        model([[0.0]])
    with pytest.raises(TypeError, match="x"):
        model(torch.zeros(2, 24, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_vars"):
        model(torch.zeros(2, 24, 4))
    with pytest.raises(ValueError, match="lookback"):
        model(torch.zeros(2, 23, 3))
    with pytest.raises(ValueError, match="horizon"):
        build_model(name, 3, 24, 0)


@pytest.mark.parametrize("channel_mixing", [False, True], ids=["independent", "mixing"])
def test_bimamba_plus_channel_mixing_is_the_only_path_across_variables(channel_mixing):
    # Variable 2's forecast depends on variable 0's look-back only when tokens mix channels.
    torch.manual_seed(7)
    model = build_model("bi-mamba+", 3, 24, 8, **SMALL["bi-mamba+"], channel_mixing=channel_mixing).eval()
    x = torch.randn(2, 24, 3, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x)[..., 2].sum(), x)
    assert grad[..., 2].abs().max() > 1e-3
    assert (grad[..., 0].abs().max() > 0) == channel_mixing


def test_smamba_needs_time_features_when_configured():
    model = build_model("s-mamba", 3, 24, 8, **SMALL["s-mamba"], n_time_features=4)
    with pytest.raises(ValueError, match="x_time"):
        model(torch.zeros(2, 24, 3))
    with pytest.raises(ValueError, match="n_time_features"):
        build_model("s-mamba", 3, 24, 8, n_time_features=-1)


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="name"):
        build_model("transformer", 3, 24, 8)


def test_revin_round_trip():
    g = torch.Generator().manual_seed(21)
    revin = RevIN(4)
    with torch.no_grad():
        revin.weight.uniform_(0.5, 2.0, generator=g)
        revin.bias.normal_(generator=g)
    x = 3 + 5 * torch.randn(2, 30, 4, generator=g)
    z, stats = revin.normalize(x)
    torch.testing.assert_close(revin.denormalize(z, stats), x, atol=1e-4, rtol=1e-4)


def test_mamba_plus_equals_mamba1_without_skip():
    torch.manual_seed(31)
    plus, base = MambaPlus(16, d_state=4), Mamba1(16, d_state=4)
    base.load_state_dict(plus.state_dict())
    with torch.no_grad():
        plus.D.zero_()
        base.D.zero_()
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(plus(x), base(x), atol=1e-5, rtol=1e-5)


def test_mamba_plus_forget_gate_on_skip():
    # z = 0: silu(z) = 0 removes the SSM path, 1 - sigmoid(z) = 1/2 keeps half of D * x'.
    torch.manual_seed(32)
    plus = MambaPlus(8, d_state=4)
    with torch.no_grad():
        plus.in_proj.weight[plus.d_inner:].zero_()
        plus.D.uniform_(0.5, 1.5)
    h = torch.randn(2, 9, 8)
    xc = causal_conv1d(plus.in_proj(h)[..., : plus.d_inner].transpose(1, 2), plus.conv1d.weight[:, 0],
                       plus.conv1d.bias, activation="silu")
    expected = plus.out_proj((0.5 * plus.D[:, None] * xc).transpose(1, 2))
    torch.testing.assert_close(plus(h), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inference_params"):
        plus(h, inference_params=object())


@pytest.mark.parametrize("branch_norm", [False, True], ids=["s-mamba", "bi-mamba+"])
def test_bidirectional_layer_sees_both_directions(branch_norm):
    torch.manual_seed(33)
    layer = BiMambaLayer(8, lambda: Mamba1(8, d_state=4), 16, dropout=0.0, branch_norm=branch_norm)
    x = torch.randn(1, 6, 8, requires_grad=True)
    out = layer(x) * torch.randn(8)  # a plain sum of a LayerNorm output has zero gradient
    first = torch.autograd.grad(out[0, 0].sum(), x, retain_graph=True)[0]
    last = torch.autograd.grad(out[0, -1].sum(), x)[0]
    assert first[0, -1].abs().sum() > 0  # token 0 depends on the last token (backward branch)
    assert last[0, 0].abs().sum() > 0  # and the last on the first (forward branch)


@pytest.mark.parametrize("mixer_dropout", [True, False])
def test_bidirectional_layer_mixer_dropout(mixer_dropout):
    # In training mode with FFN output zeroed, the layer output is an add-norm of x and the mixers'
    # outputs: with mixer_dropout=False it is deterministic, with True two calls differ.
    torch.manual_seed(34)
    layer = BiMambaLayer(8, lambda: Mamba1(8, d_state=4), 16, dropout=0.5, branch_norm=True,
                         mixer_dropout=mixer_dropout).train()
    with torch.no_grad():
        layer.ffn.down.weight.zero_()
        layer.ffn.down.bias.zero_()
    x = torch.randn(2, 6, 8)
    same = torch.equal(layer(x), layer(x))
    assert same != mixer_dropout


def test_patchify_pads_and_views():
    x = torch.arange(10.0).view(1, 1, 10)
    p = patchify(x, 4, 2)
    assert p.shape == (1, 1, (10 - 4) // 2 + 2, 4)
    torch.testing.assert_close(p[0, 0, 0], torch.tensor([0.0, 1, 2, 3]))
    torch.testing.assert_close(p[0, 0, -1], torch.tensor([8.0, 9, 9, 9]))
    torch.testing.assert_close(patchify(x, 3, 2)[0, 0, -1], torch.tensor([8.0, 9, 9]))


def test_patchify_to_a_multiple_of_the_stride():
    # The Bi-Mamba+ authors' patching: no padding when the stride divides the look-back, else up
    # to the next multiple of it.
    x = torch.arange(10.0).view(1, 1, 10)
    p = patchify(x, 4, 2, padding="to-multiple")
    assert p.shape == (1, 1, 4, 4)
    torch.testing.assert_close(p[0, 0, -1], torch.tensor([6.0, 7, 8, 9]))
    p = patchify(x[..., :9], 4, 2, padding="to-multiple")
    assert p.shape == (1, 1, 4, 4)
    torch.testing.assert_close(p[0, 0, -1], torch.tensor([6.0, 7, 8, 8]))
    for lookback, patch_len, stride in [(96, 4, 2), (96, 24, 12), (96, 16, 8), (97, 16, 8), (30, 7, 4)]:
        for padding in PATCH_PADDINGS:
            shape = patchify(torch.zeros(1, 1, lookback), patch_len, stride, padding).shape
            assert shape[2] == patch_count(lookback, patch_len, stride, padding), (lookback, patch_len, stride, padding)
    assert patch_count(96, 4, 2, "to-multiple") == 47 and patch_count(96, 4, 2) == 48
    with pytest.raises(ValueError, match="padding"):
        patch_count(96, 4, 2, "both")


def test_bi_mamba_plus_with_the_authors_patching():
    model = build_model("bi-mamba+", 3, 24, 8, **{**SMALL["bi-mamba+"], "patch_padding": "to-multiple"}).eval()
    assert model.n_patches == (24 - 8) // 4 + 1 and model.head.in_features == model.n_patches * 16
    assert model(torch.randn(2, 24, 3)).shape == (2, 8, 3)


def test_sra_decider():
    g = torch.Generator().manual_seed(41)
    base = torch.randn(500, 1, generator=g).cumsum(0)
    related = base + 0.1 * torch.randn(500, 4, generator=g)
    assert sra_decider(related) is True
    assert sra_decider(torch.randn(500, 4, generator=g)) is False
    with pytest.raises(ValueError, match="train"):
        sra_decider(torch.randn(50, 1, generator=g))
    with pytest.raises(ValueError, match="threshold"):
        sra_decider(related, threshold=1.5)


@pytest.mark.parametrize("name, lr", [("s-mamba", 3e-3), ("bi-mamba+", 3e-3), ("ms-mamba", 3e-3), ("sor-mamba", 3e-3),
                                      ("mambats", 3e-3), ("spectromamba", 3e-3), ("attention-mamba", 3e-3), ("mamba-probtsf", 3e-3),
                                      ("dlinear", 1e-2),
                                      ("lstm", 1e-2)])
def test_learns_periodic_signal(periodic_csv, tmp_path, name, lr):
    r = run_forecast(ForecastConfig(data=str(periodic_csv), model=name, lookback=48, horizon=24, epochs=6,
                                    lr=lr, batch_size=16, borders=BORDERS, out=str(tmp_path / "run"), seed=1,
                                    progress=False, model_overrides=SMALL[name]))
    splits = ett_splits(read_csv(periodic_csv), 48, BORDERS)
    mean_baseline = float(splits.test[48:].square().mean())  # predicting the training mean (0 after standardising)
    assert r["mse"] < 0.25 * mean_baseline, (r["mse"], mean_baseline)
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "run" / "forecast.png").exists()
    if name == "mamba-probtsf":  # the noisy periodic series: most targets inside the 2-sigma band
        assert 0.5 < r["coverage_2sigma"] <= 1.0, r["coverage_2sigma"]
    else:
        assert "coverage_2sigma" not in r


def test_multiscale_mamba_scales_step_sizes():
    torch.manual_seed(51)
    mixer = MultiScaleMamba(8, scales=(1.0, 10.0), d_state=4)
    for m, s in zip(mixer.mixers, (1.0, 10.0)):
        dt = torch.nn.functional.softplus(m.dt_proj.bias)
        assert dt.min() >= 1e-3 * s * 0.999 and dt.max() <= 0.1 * s * 1.001
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(mixer(x), (mixer.mixers[0](x) + mixer.mixers[1](x)) / 2)
    with pytest.raises(ValueError, match="scales"):
        MultiScaleMamba(8, scales=(1.0, -2.0))


def test_sor_mamba_regularizer():
    torch.manual_seed(52)
    g = torch.Generator().manual_seed(52)
    model = build_model("sor-mamba", 3, 24, 8, **SMALL["sor-mamba"], dropout=0.0)
    assert not any(isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1 for m in model.modules())
    x = torch.randn(4, 24, 3, generator=g)
    assert model.regularizer(x) > 0  # a unidirectional scan depends on the channel order
    single = build_model("sor-mamba", 1, 24, 8, **SMALL["sor-mamba"], dropout=0.0)
    assert single.regularizer(torch.randn(4, 24, 1, generator=g)) == 0  # one channel: reversing is identity
    with pytest.raises(ValueError, match="reg_weight"):
        build_model("sor-mamba", 3, 24, 8, reg_weight=-1.0)


def test_pooled_attention_mixes_tokens_through_pooled_scores():
    from mambakit.forecasting.blocks import PooledAttention

    torch.manual_seed(0)
    attn = PooledAttention(16, lambda: Mamba1(16, d_state=4), pooled=4, dropout=0.0).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k = attn._pool(attn.query(x)), attn._pool(attn.key(x))
    assert q.shape == (2, 5, 4)
    # Pooling: the average of each quarter of the features plus its maximum.
    full_q = attn.query(x).view(2, 5, 4, 4)
    assert torch.allclose(q, full_q.mean(-1) + full_q.amax(-1))
    v = attn.value_forward(x) + attn.value_backward(x.flip(1)).flip(1)
    expected = attn.out(torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v)
    assert torch.allclose(attn(x), expected)
    with pytest.raises(ValueError, match="pooled"):
        PooledAttention(16, lambda: Mamba1(16), pooled=32)


def test_prob_mamba_distribution_and_loss():
    torch.manual_seed(0)
    model = build_model("mamba-probtsf", 3, 24, 8, **SMALL["mamba-probtsf"]).eval()  # no dropout
    x, y = 5 + 3 * torch.randn(4, 24, 3), torch.randn(4, 8, 3)
    mean, variance = model.predict_distribution(x)
    assert torch.equal(mean, model(x)) and (variance > 0).all()
    # The variance follows the window's scale: scaling the input by 10 scales the variance by 100.
    _, scaled = model.predict_distribution(10 * x)
    assert torch.allclose(scaled, 100 * variance, rtol=1e-3)
    loss = model.training_loss(x, None, y)
    expected = torch.nn.functional.mse_loss(mean, y) + 0.5 * (variance.log() + (y - mean) ** 2 / variance).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()  # the NLL reaches the variance network, not the mean network
    model.zero_grad()
    nll = torch.nn.functional.gaussian_nll_loss(mean.detach(), y, model.predict_distribution(x)[1])
    nll.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.mean_net.parameters())
    assert any(p.grad is not None and p.grad.any() for p in model.log_var_net.parameters())


def test_shortest_path_order_finds_a_hidden_zero_cost_path():
    from mambakit.forecasting.blocks import shortest_path_order

    g = torch.Generator().manual_seed(0)
    for n in (4, 7, 9):
        hidden = torch.randperm(n, generator=g).tolist()
        cost = 1 + torch.rand(n, n, generator=g)
        for a, b in zip(hidden, hidden[1:]):
            cost[a, b] = 0.0  # the reverse direction stays expensive: the problem is asymmetric
        assert shortest_path_order(cost, steps=3000) == hidden
    assert shortest_path_order(torch.tensor([[0.0, 5.0], [1.0, 0.0]])) == [1, 0]
    with pytest.raises(ValueError, match="square"):
        shortest_path_order(torch.zeros(2, 3))


def test_mambats_variable_order_from_training_losses():
    torch.manual_seed(0)
    model = build_model("mambats", 4, 24, 8, **SMALL["mambats"])
    assert model.scan_order() == [0, 1, 2, 3]  # nothing seen yet
    x, y = torch.randn(8, 24, 4), torch.randn(8, 8, 4)
    model.train()
    for _ in range(3):
        model.training_loss(x, None, y).backward()
    assert model.pair_count.sum() == 3 * 3  # three permutations of four variables, three pairs each
    # Rigged costs: the path 2 -> 0 -> 3 -> 1 is cheap, every other pair expensive.
    model.pair_count.fill_(1.0)
    model.pair_cost_sum.fill_(5.0)
    for a, b in ((2, 0), (0, 3), (3, 1)):
        model.pair_cost_sum[a, b] = 1.0
    assert model.scan_order() == [2, 0, 3, 1]
    model.eval()
    out = model(x)
    # The forecast is returned in the variables' own order: permuting the input variables
    # permutes the output the same way when the scan order is permuted alongside.
    perm = torch.tensor([1, 3, 0, 2])
    rank = torch.argsort(perm)
    model.pair_cost_sum.copy_(model.pair_cost_sum[perm][:, perm].clone())
    assert model.scan_order() == [rank[v].item() for v in [2, 0, 3, 1]]
    assert torch.allclose(model(x[..., perm]), out[..., perm], atol=1e-5)


def test_spectral_attention_frequency_branch_is_complex_attention():
    """The frequency branch against complex arithmetic written out with torch.complex tensors."""
    from mambakit.forecasting.blocks import SpectralAttention

    torch.manual_seed(0)
    attn = SpectralAttention(12, 8, dropout=0.0).double()
    series = torch.randn(2, 5, 12, dtype=torch.float64)
    spectrum = torch.fft.rfft(series, dim=-1)
    weight = torch.complex(attn.freq_qkv_re.weight, attn.freq_qkv_im.weight)  # (3 D, F)
    q, k, v = (spectrum @ weight.t()).chunk(3, dim=-1)
    scores = torch.softmax((q @ k.conj().transpose(1, 2)).real / 8 ** 0.5, dim=-1)
    mixed = scores.to(v.dtype) @ v
    freq = attn.freq_out(torch.cat([attn.norm_re(mixed.real), attn.norm_im(mixed.imag)], dim=-1))
    tokens = attn.embed(series)
    tq, tk, tv = attn.time_qkv(tokens).chunk(3, dim=-1)
    time = tokens + torch.softmax(tq @ tk.transpose(1, 2) / 8 ** 0.5, dim=-1) @ tv
    assert torch.allclose(attn(series), time + freq)
