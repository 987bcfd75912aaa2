"""Forecasting models as documented configurations of the shared blocks.

Every model maps x (b, L, n) (look-back window, n variables) and optional calendar features
x_time (b, L, f) to a forecast (b, H, n). ``MODELS`` names them for the CLI; ``PAPER_CONFIGS``
holds the published ETTh1 hyper-parameters (model part) of each.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.mamba1 import Mamba1
from .blocks import (BiMambaLayer, MambaPlus, MultiScaleMamba, PooledAttention, RevIN, SpectralAttention,
                     check_series, patch_count, patchify, positive_ints, shortest_path_order, temporal_mamba)


class _Forecaster(nn.Module):
    """Common constructor checks and the input check of every model."""

    n_time_features = 0  # calendar features the model reads from x_time (S-Mamba only)

    def __init__(self, n_vars: int, lookback: int, horizon: int):
        super().__init__()
        positive_ints(n_vars=n_vars, lookback=lookback, horizon=horizon)
        self.n_vars, self.lookback, self.horizon = n_vars, lookback, horizon

    def _check(self, x, x_time) -> None:
        check_series(x, self.n_vars, self.lookback)
        if self.n_time_features:
            if not isinstance(x_time, torch.Tensor) or tuple(x_time.shape) != (x.shape[0], self.lookback,
                                                                             self.n_time_features):
                raise ValueError(f"x_time: expected shape (b, lookback, f) = ({x.shape[0]}, {self.lookback}, "
                                 f"{self.n_time_features}), got {getattr(x_time, 'shape', x_time)}")


class SMamba(_Forecaster):
    """S-Mamba (Wang et al., "Is Mamba effective for time series forecasting?", 2024).

    Variate tokens: each variable's look-back (after instance normalisation) is one token,
    Linear(L -> D); calendar features, when ``n_time_features > 0``, are extra tokens (as the
    official code does). ``n_layers`` x :class:`BiMambaLayer` (``branch_norm=False``: x + Mamba_f(x)
    + flip(Mamba_b(flip(x))) across the variate tokens, LN, FFN, LN), a final LN, Linear(D -> H).
    Mixers: ``Mamba1(D, d_state, d_conv, expand)``.

    Defaults are the paper's ETTh1 settings: d_model 256, d_state 2, d_ff 256, 2 layers,
    d_conv 2, expand 1, dropout 0.1, GELU.

    ms-Mamba is this model with ``scales`` given: every mixer becomes a
    :class:`~mambakit.forecasting.blocks.MultiScaleMamba` with those step-size factors.
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, d_model: int = 256, d_state: int = 2,
                 d_ff: int = 256, n_layers: int = 2, d_conv: int = 2, expand: int = 1, dropout: float = 0.1,
                 n_time_features: int = 0, scales: tuple[float, ...] | None = None):
        super().__init__(n_vars, lookback, horizon)
        positive_ints(d_model=d_model, d_ff=d_ff, n_layers=n_layers)
        if isinstance(n_time_features, bool) or not isinstance(n_time_features, int) or n_time_features < 0:
            raise ValueError(f"n_time_features: expected an int >= 0, got {n_time_features!r}")
        self.n_time_features = n_time_features
        self.norm = RevIN(n_vars, affine=False)
        self.embed = nn.Linear(lookback, d_model)
        self.dropout = nn.Dropout(dropout)
        mamba = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        make_mixer = (lambda: Mamba1(d_model, **mamba)) if scales is None else (
            lambda: MultiScaleMamba(d_model, scales, **mamba))
        self.layers = nn.ModuleList(BiMambaLayer(d_model, make_mixer, d_ff, dropout) for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, horizon)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n), x_time (b, L, n_time_features) when n_time_features > 0 -> (b, H, n)."""
        y, stats = self.normalised_forecast(x, x_time)
        return self.norm.denormalize(y, stats)

    def normalised_forecast(self, x: torch.Tensor, x_time: torch.Tensor | None = None):
        """-> (the forecast (b, H, n) in instance-normalised units, the (mean, std) of each window)."""
        self._check(x, x_time)
        x, stats = self.norm.normalize(x)
        if self.n_time_features:
            x = torch.cat([x, x_time.to(x.dtype)], dim=-1)
        tokens = self.dropout(self.embed(x.transpose(1, 2)))  # (b, n + f, L) -> (b, n + f, D)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.head(self.final_norm(tokens))[:, : self.n_vars].transpose(1, 2), stats


class BiMambaPlus(_Forecaster):
    """Bi-Mamba+ (Liang et al., "Bi-Mamba+: Bidirectional Mamba for time series forecasting", 2024).

    Instance normalisation; each series cut into patches (``patch_len``, ``stride``, the end
    padded as ``patch_padding`` says), Linear(patch_len -> D); ``n_layers`` x
    :class:`BiMambaLayer` with :class:`MambaPlus` mixers, ``branch_norm=True`` and no dropout on
    the mixer outputs; a final LayerNorm; flatten the patch tokens and Linear(P * D -> H) per
    variable.

    Tokenisation (chosen by :func:`~mambakit.forecasting.blocks.sra_decider` on the training
    split, or given): ``channel_mixing=False`` runs each variable's patch sequence alone
    (b * n sequences of P tokens); ``True`` scans across the variables instead, one sequence of
    n variable tokens per patch position (b * P sequences), as the authors' code does.

    Defaults are the paper's ETTh1 settings: 1 layer, patch 4, stride 2, d_model 64, d_ff 128,
    d_state 8, dropout 0.2; d_conv 2 and expand 1 are the defaults of the authors' code (the paper
    does not give them). ``patch_padding`` (see :data:`~mambakit.forecasting.blocks.PATCH_PADDINGS`):
    "stride" (default, PatchTST's: 48 patches of 4 from 96 steps) or "to-multiple" (the authors'
    code: 47).
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, d_model: int = 64, d_state: int = 8,
                 d_ff: int = 128, n_layers: int = 1, patch_len: int = 4, stride: int = 2, d_conv: int = 2,
                 expand: int = 1, dropout: float = 0.2, channel_mixing: bool = False, patch_padding: str = "stride"):
        super().__init__(n_vars, lookback, horizon)
        positive_ints(d_model=d_model, d_ff=d_ff, n_layers=n_layers)
        self.n_patches = patch_count(lookback, patch_len, stride, patch_padding)
        self.patch_len, self.stride, self.channel_mixing = patch_len, stride, bool(channel_mixing)
        self.patch_padding = patch_padding
        self.revin = RevIN(n_vars, affine=False)
        self.embed = nn.Linear(patch_len, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BiMambaLayer(d_model, lambda: MambaPlus(d_model, d_state=d_state, d_conv=d_conv, expand=expand), d_ff,
                         dropout, branch_norm=True, mixer_dropout=False)
            for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(self.n_patches * d_model, horizon)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> (b, H, n); x_time is ignored."""
        self._check(x, x_time)
        b, n = x.shape[0], self.n_vars
        x, stats = self.revin.normalize(x)
        patches = patchify(x.transpose(1, 2), self.patch_len, self.stride, self.patch_padding)  # (b, n, P, patch_len)
        tokens = self.dropout(self.embed(patches))  # (b, n, P, D)
        if self.channel_mixing:
            tokens = tokens.transpose(1, 2)  # (b, P, n, D): the scan runs over variables
        tokens = tokens.flatten(0, 1)
        for layer in self.layers:
            tokens = layer(tokens)
        tokens = self.final_norm(tokens).unflatten(0, (b, -1))
        if self.channel_mixing:
            tokens = tokens.transpose(1, 2)
        y = self.head(tokens.flatten(2)).transpose(1, 2)  # (b, n, P * D) -> (b, H, n)
        return self.revin.denormalize(y, stats)


class SORMamba(_Forecaster):
    """SOR-Mamba (Lee et al., "Sequential order-robust Mamba for time series forecasting", 2025).

    Variate tokens as S-Mamba (instance norm, Linear(L -> D)), but ``n_layers`` unidirectional
    layers (x = LN(x + Mamba(x)), LN(x + FFN(x))) whose Mamba has no convolution across tokens
    (``d_conv=1``: a per-channel scale, since channel order carries no meaning), a final LN and
    Linear(D -> H). :meth:`regularizer` is the order-robustness term
    ``reg_weight * mean((f(X) - reverse(f(reverse_channels(X))))^2)``, f the token encoder, which
    the trainer adds to the loss.

    Defaults: d_model 256, d_state 2, d_ff 256, 2 layers, dropout 0.1 (S-Mamba's ETTh1 sizes),
    reg_weight 0.1 (our choice).
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, d_model: int = 256, d_state: int = 2,
                 d_ff: int = 256, n_layers: int = 2, expand: int = 1, dropout: float = 0.1, reg_weight: float = 0.1):
        super().__init__(n_vars, lookback, horizon)
        positive_ints(d_model=d_model, d_ff=d_ff, n_layers=n_layers)
        if not reg_weight >= 0:
            raise ValueError(f"reg_weight: expected a number >= 0, got {reg_weight!r}")
        self.reg_weight = reg_weight
        self.norm = RevIN(n_vars, affine=False)
        self.embed = nn.Linear(lookback, d_model)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BiMambaLayer(d_model, lambda: Mamba1(d_model, d_state=d_state, d_conv=1, expand=expand), d_ff, dropout,
                         bidirectional=False)
            for _ in range(n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, horizon)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """normalised x (b, L, n) -> tokens (b, n, D)."""
        tokens = self.dropout(self.embed(x.transpose(1, 2)))
        for layer in self.layers:
            tokens = layer(tokens)
        return self.final_norm(tokens)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> (b, H, n); x_time is ignored."""
        self._check(x, x_time)
        x, stats = self.norm.normalize(x)
        return self.norm.denormalize(self.head(self._encode(x)).transpose(1, 2), stats)

    def regularizer(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted order-robustness term (a scalar) for the window x (b, L, n)."""
        self._check(x, x_time)
        x, _ = self.norm.normalize(x)
        return self.reg_weight * (self._encode(x) - self._encode(x.flip(-1)).flip(1)).square().mean()


class MambaTS(_Forecaster):
    """MambaTS (Cai et al., "MambaTS: improved selective state space models for long-term time
    series forecasting", 2024).

    RevIN; every variable's series cut into patches (``patch_len``, ``stride``), Linear(patch_len
    -> D) plus a learned position per patch; all variables' patches in ONE scan, time-major
    (patch 1 of every variable, then patch 2, ...), the variables in a chosen order within each
    step; ``n_layers`` x [x = LN(x + TMB(x)), x = LN(x + FFN(x))] (:class:`BiMambaLayer`, one direction)
    with the temporal Mamba block
    (:func:`~mambakit.forecasting.blocks.temporal_mamba`: no convolution, dropout on Delta/B/C);
    per variable, its patch tokens flattened and Linear(P * D -> H).

    Variable order: while training, :meth:`training_loss` draws a random permutation per batch
    (variable permutation training) and adds the batch's loss to the running cost of every
    consecutive pair (i, j) in it; in eval mode the order is the variable-aware scan order, the
    open path through the variables with the lowest mean pair cost found by simulated annealing
    (:func:`~mambakit.forecasting.blocks.shortest_path_order`), recomputed when the costs change.
    Pairs never seen cost their mean. Defaults: d_model 128, d_state 16, d_ff 256, 2 layers,
    patch 16, stride 8, dropout 0.1 (our choices; the paper's per-dataset settings are not encoded).
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, d_model: int = 128, d_state: int = 16,
                 d_ff: int = 256, n_layers: int = 2, patch_len: int = 16, stride: int = 8, expand: int = 2,
                 dropout: float = 0.1, anneal_steps: int = 2000):
        super().__init__(n_vars, lookback, horizon)
        positive_ints(d_model=d_model, d_ff=d_ff, n_layers=n_layers)
        self.n_patches = patch_count(lookback, patch_len, stride)
        self.patch_len, self.stride, self.anneal_steps = patch_len, stride, anneal_steps
        self.revin = RevIN(n_vars, affine=True)
        self.embed = nn.Linear(patch_len, d_model)
        self.position = nn.Parameter(torch.zeros(self.n_patches, d_model))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            BiMambaLayer(d_model, lambda: temporal_mamba(d_model, dropout, d_state=d_state, expand=expand), d_ff,
                         dropout, bidirectional=False)
            for _ in range(n_layers))
        self.head = nn.Linear(self.n_patches * d_model, horizon)
        self.register_buffer("pair_cost_sum", torch.zeros(n_vars, n_vars, dtype=torch.float64))
        self.register_buffer("pair_count", torch.zeros(n_vars, n_vars, dtype=torch.float64))
        self._order_cache = None  # (the mean costs it was computed from, order)

    def scan_order(self) -> list[int]:
        """The variable-aware scan order from the pair costs gathered so far (identity before any);
        recomputed only when the mean costs change."""
        cost = self.pair_cost_sum / self.pair_count.clamp(min=1)
        seen = self.pair_count > 0
        if seen.any():
            cost = torch.where(seen, cost, cost[seen].mean())
        key = tuple(cost.flatten().tolist())
        if self._order_cache is None or self._order_cache[0] != key:
            self._order_cache = (key, shortest_path_order(cost, self.anneal_steps))
        return self._order_cache[1]

    def _forecast(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """normalised x (b, L, n), variable order (n,) -> normalised forecast (b, H, n)."""
        b, n, P = x.shape[0], self.n_vars, self.n_patches
        tokens = self.embed(patchify(x.transpose(1, 2)[:, order], self.patch_len, self.stride)) + self.position
        tokens = self.dropout(tokens).transpose(1, 2).reshape(b, P * n, -1)  # time-major: (b, P * n, D)
        for layer in self.layers:
            tokens = layer(tokens)
        per_var = tokens.reshape(b, P, n, -1).transpose(1, 2).reshape(b, n, -1)  # (b, n, P * D), scan order
        y = self.head(per_var)[:, torch.argsort(order)]  # back to the variables' own order
        return y.transpose(1, 2)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> (b, H, n) in the variable-aware scan order; x_time is ignored."""
        self._check(x, x_time)
        order = torch.tensor(self.scan_order(), device=x.device)
        x, stats = self.revin.normalize(x)
        return self.revin.denormalize(self._forecast(x, order), stats)

    def training_loss(self, x: torch.Tensor, x_time: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """MSE under a random variable order; the loss is charged to every consecutive pair of it."""
        self._check(x, x_time)
        order = torch.randperm(self.n_vars).to(x.device)
        x_norm, stats = self.revin.normalize(x)
        loss = F.mse_loss(self.revin.denormalize(self._forecast(x_norm, order), stats), y)
        with torch.no_grad():
            i, j = order[:-1].cpu(), order[1:].cpu()
            self.pair_cost_sum[i, j] += float(loss)
            self.pair_count[i, j] += 1
        return loss


class _VariateTokenForecaster(_Forecaster):
    """Instance normalisation, a tokenizer (b, n, L) -> (b, n, D) of each variable's look-back,
    dropout, ``layers`` (each (b, n, D) -> (b, n, D)), a final LN and Linear(D -> H)."""

    def __init__(self, n_vars: int, lookback: int, horizon: int, tokenizer: nn.Module, layers, d_model: int,
                 dropout: float):
        super().__init__(n_vars, lookback, horizon)
        self.norm = RevIN(n_vars, affine=False)
        self.tokenizer = tokenizer
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(layers)
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, horizon)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> (b, H, n); x_time is ignored."""
        self._check(x, x_time)
        x, stats = self.norm.normalize(x)
        tokens = self.dropout(self.tokenizer(x.transpose(1, 2)))  # (b, n, D)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.norm.denormalize(self.head(self.final_norm(tokens)).transpose(1, 2), stats)


class SpectroMamba(_VariateTokenForecaster):
    """SpectroMamba / BV-Mamba: spectral attention, then a bidirectional variable Mamba.

    Instance normalisation; :class:`~mambakit.forecasting.blocks.SpectralAttention` turns each
    variable's look-back into a token (time branch + complex-valued frequency branch, attention
    across the variables); ``n_layers`` x :class:`BiMambaLayer` over the variable tokens (S-Mamba's
    arrangement); a final LN and Linear(D -> H). Sizes default to S-Mamba's ETTh1 ones (the
    source's exact settings are not encoded): d_model 256, d_state 2, d_ff 256, 2 layers.
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, d_model: int = 256, d_state: int = 2,
                 d_ff: int = 256, n_layers: int = 2, d_conv: int = 2, expand: int = 1, dropout: float = 0.1):
        positive_ints(n_vars=n_vars, lookback=lookback, horizon=horizon, d_model=d_model, d_ff=d_ff,
                      n_layers=n_layers)
        mamba = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        layers = [BiMambaLayer(d_model, lambda: Mamba1(d_model, **mamba), d_ff, dropout) for _ in range(n_layers)]
        super().__init__(n_vars, lookback, horizon, SpectralAttention(lookback, d_model, dropout), layers, d_model,
                         dropout)


class AttentionMamba(_VariateTokenForecaster):
    """Attention Mamba (Xiong et al., "Attention Mamba: time series modeling with adaptive pooling
    acceleration and receptive field enhancements", 2025), on variate tokens as S-Mamba.

    Instance normalisation, Linear(L -> D) per variable; ``n_layers`` x [x = LN(x +
    PooledAttention(x)), x = LN(x + FFN(x))] (:class:`BiMambaLayer`, one direction) where
    :class:`~mambakit.forecasting.blocks.PooledAttention` pools queries and keys (adaptive average
    + max) and takes its values from a bidirectional Mamba; a final LN and Linear(D -> H). Sizes
    default to S-Mamba's ETTh1 ones (the paper's exact settings are not encoded): d_model 256,
    d_state 2, d_ff 256, 2 layers, pooled width D / 4.
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, d_model: int = 256, d_state: int = 2,
                 d_ff: int = 256, n_layers: int = 2, d_conv: int = 2, expand: int = 1, pooled: int | None = None,
                 dropout: float = 0.1):
        positive_ints(n_vars=n_vars, lookback=lookback, horizon=horizon, d_model=d_model, d_ff=d_ff,
                      n_layers=n_layers)
        mamba = dict(d_state=d_state, d_conv=d_conv, expand=expand)
        layers = [BiMambaLayer(d_model, lambda: PooledAttention(d_model, lambda: Mamba1(d_model, **mamba), pooled,
                                                                dropout), d_ff, dropout, bidirectional=False)
                  for _ in range(n_layers)]
        super().__init__(n_vars, lookback, horizon, nn.Linear(lookback, d_model), layers, d_model, dropout)


class ProbMamba(_Forecaster):
    """Mamba-ProbTSF (Pessoa et al., "Mamba time series forecasting with uncertainty
    quantification", 2025): two S-Mamba networks, one for the mean and one for the log-variance of
    a Gaussian forecast.

    ``forward`` returns the mean (b, H, n), so MSE/MAE compare as for every model;
    :meth:`predict_distribution` returns (mean, variance) in the data's units (the variance
    network works on instance-normalised values; its variance is scaled by each window's
    variance). :meth:`training_loss` replaces the trainer's MSE: MSE of the mean plus the Gaussian
    negative log-likelihood of the target under (mean, variance) with the mean detached, so the
    variance network learns the spread of the mean network's errors without pulling the mean.
    Both networks take S-Mamba's settings (``SMamba``'s keyword arguments).
    """

    def __init__(self, n_vars: int, lookback: int, horizon: int, **smamba):
        super().__init__(n_vars, lookback, horizon)
        self.mean_net = SMamba(n_vars, lookback, horizon, **smamba)
        self.log_var_net = SMamba(n_vars, lookback, horizon, **smamba)
        self.n_time_features = self.mean_net.n_time_features

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> mean forecast (b, H, n)."""
        return self.mean_net(x, x_time)

    def predict_distribution(self, x: torch.Tensor, x_time: torch.Tensor | None = None):
        """-> (mean, variance), each (b, H, n); variance > 0. The variance network's output is
        taken before instance de-normalisation (a log-variance must not get the window's mean
        added) and exponentiated, then scaled by the window's variance."""
        mean = self.mean_net(x, x_time)
        log_var, (_, window_std) = self.log_var_net.normalised_forecast(x, x_time)
        return mean, torch.exp(log_var) * window_std.square()

    def training_loss(self, x: torch.Tensor, x_time: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        mean, variance = self.predict_distribution(x, x_time)
        return F.mse_loss(mean, y) + F.gaussian_nll_loss(mean.detach(), y, variance, eps=1e-6)


class DLinear(_Forecaster):
    """DLinear (Zeng et al., AAAI 2023): a moving average (``kernel``, replicate-padded) splits
    each series into trend and remainder; one Linear(L -> H) each, shared by the variables,
    outputs summed. Default kernel 25."""

    def __init__(self, n_vars: int, lookback: int, horizon: int, kernel: int = 25):
        super().__init__(n_vars, lookback, horizon)
        positive_ints(kernel=kernel)
        if kernel % 2 == 0:
            raise ValueError(f"kernel: expected an odd int, got {kernel}")
        self.kernel = kernel
        self.trend, self.seasonal = nn.Linear(lookback, horizon), nn.Linear(lookback, horizon)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> (b, H, n); x_time is ignored."""
        self._check(x, x_time)
        s = x.transpose(1, 2)  # (b, n, L)
        pad = (self.kernel - 1) // 2
        trend = F.avg_pool1d(F.pad(s, (pad, pad), mode="replicate"), self.kernel, stride=1)
        return (self.trend(trend) + self.seasonal(s - trend)).transpose(1, 2)


class LSTMForecaster(_Forecaster):
    """LSTM baseline: instance normalisation, an LSTM over the L time steps (all n variables as
    input), Linear(hidden -> H * n) on the last hidden state. Defaults: hidden 128, 2 layers."""

    def __init__(self, n_vars: int, lookback: int, horizon: int, hidden: int = 128, n_layers: int = 2,
                 dropout: float = 0.0):
        super().__init__(n_vars, lookback, horizon)
        positive_ints(hidden=hidden, n_layers=n_layers)
        self.norm = RevIN(n_vars, affine=False)
        self.lstm = nn.LSTM(n_vars, hidden, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0)
        self.head = nn.Linear(hidden, horizon * n_vars)

    def forward(self, x: torch.Tensor, x_time: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, n) -> (b, H, n); x_time is ignored."""
        self._check(x, x_time)
        x, stats = self.norm.normalize(x)
        out, _ = self.lstm(x)  # (b, L, hidden)
        y = self.head(out[:, -1]).view(x.shape[0], self.horizon, self.n_vars)
        return self.norm.denormalize(y, stats)


MODELS = {"s-mamba": SMamba, "bi-mamba+": BiMambaPlus, "ms-mamba": SMamba, "sor-mamba": SORMamba,
          "mambats": MambaTS, "spectromamba": SpectroMamba, "attention-mamba": AttentionMamba, "mamba-probtsf": ProbMamba, "dlinear": DLinear, "lstm": LSTMForecaster}

# Published ETTh1 (L = 96) settings, model part; training settings are in train.PAPER_TRAINING.
PAPER_CONFIGS = {
    "s-mamba": dict(d_model=256, d_state=2, d_ff=256, n_layers=2, n_time_features=4),
    "bi-mamba+": dict(d_model=64, d_state=8, d_ff=128, n_layers=1, patch_len=4, stride=2, dropout=0.2),
    # ms-Mamba and SOR-Mamba: S-Mamba's ETTh1 sizes (their papers' exact settings are not encoded here)
    "ms-mamba": dict(d_model=256, d_state=2, d_ff=256, n_layers=2, n_time_features=4, scales=(1.0, 2.0, 4.0)),
    "sor-mamba": dict(d_model=256, d_state=2, d_ff=256, n_layers=2),
    "mambats": dict(d_model=128, d_state=16, d_ff=256, n_layers=2, patch_len=16, stride=8),
    # SpectroMamba, Attention Mamba and Mamba-ProbTSF: S-Mamba's ETTh1 sizes as well
    "spectromamba": dict(d_model=256, d_state=2, d_ff=256, n_layers=2),
    "attention-mamba": dict(d_model=256, d_state=2, d_ff=256, n_layers=2),
    "mamba-probtsf": dict(d_model=256, d_state=2, d_ff=256, n_layers=2),
    "dlinear": dict(kernel=25),
    "lstm": dict(hidden=128, n_layers=2),
}


def build_model(name: str, n_vars: int, lookback: int, horizon: int, **overrides) -> _Forecaster:
    """The model ``name`` (a key of MODELS) with its PAPER_CONFIGS settings, updated by ``overrides``."""
    if name not in MODELS:
        raise ValueError(f"name: expected one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name](n_vars, lookback, horizon, **{**PAPER_CONFIGS[name], **overrides})
