"""Shared blocks of the forecasting models: instance normalisation (RevIN), the Mamba+ mixer,
patching, the FFN and the bidirectional Mamba layer with add-norm.

Tensor layout: series are (b, L, n) (batch, time, variables) at the model boundary; token
sequences inside are (b, tokens, d_model).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.mamba1 import Mamba1, at_least_fp32, check_hidden_states
from ..ops.conv1d import causal_conv1d
from ..ops.selective_scan import selective_scan


def check_series(x, n_vars: int, lookback: int, name: str = "x") -> None:
    """Reject anything but a (b, lookback, n_vars) float tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor, got {x.dtype}")
    if x.dim() != 3 or x.shape[1] != lookback or x.shape[2] != n_vars:
        raise ValueError(f"{name}: expected shape (b, lookback, n_vars) = (b, {lookback}, {n_vars}), "
                         f"got {tuple(x.shape)}")


def positive_ints(**values) -> None:
    """Raise ValueError naming the first argument that is not a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")


class RevIN(nn.Module):
    """Reversible instance normalisation (Kim et al., ICLR 2022): each series of each window is
    standardised over time before the model and the statistics are put back on the forecast.

    Args:
        n_vars: number of variables n. affine: learn a per-variable scale and shift (RevIN) or not
            (plain instance normalisation, as S-Mamba), default True. eps: added to the variance,
            default 1e-5.

    ``normalize(x (b, L, n)) -> (x_norm (b, L, n), stats)``; ``denormalize(y (b, H, n), stats)``.
    """

    def __init__(self, n_vars: int, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_vars)) if affine else None
        self.bias = nn.Parameter(torch.zeros(n_vars)) if affine else None

    def normalize(self, x: torch.Tensor):
        mean = x.mean(1, keepdim=True).detach()
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps).detach()
        x = (x - mean) / std
        if self.weight is not None:
            x = x * self.weight + self.bias
        return x, (mean, std)

    def denormalize(self, y: torch.Tensor, stats) -> torch.Tensor:
        mean, std = stats
        if self.weight is not None:
            y = (y - self.bias) / (self.weight + self.eps * self.eps)
        return y * std + mean


class MambaPlus(Mamba1):
    """The Mamba+ mixer of Bi-Mamba+ (Liang et al., 2024): Mamba-1 with a forget gate between the
    SSM output and the skip term, (b, l, d_model) -> (b, l, d_model):

        x', z = silu(conv(W_x h)), W_z h;  y = SSM(x') (no D term)
        out = W_o [ y * silu(z) + (D * x') * (1 - sigmoid(z)) ]

    Parameters, names and initialisation are those of :class:`~mambakit.layers.Mamba1` (same
    arguments); with ``d_conv=1`` the conv is a per-channel scale (what "no conv" means for a
    layer that keeps the official parameter set). Inference caches are not supported.
    """

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        if inference_params is not None:
            raise ValueError("inference_params: MambaPlus has no decode path; pass None")
        check_hidden_states(hidden_states, self.d_model)
        x, z = self.in_proj(hidden_states).transpose(1, 2).chunk(2, dim=1)  # (b, d_inner, l) each
        x = causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu")
        dt, B, C = torch.split(self.x_proj(x.transpose(1, 2)), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, d_inner, l); bias goes in the scan
        y = selective_scan(x, dt, -torch.exp(at_least_fp32(self.A_log)), B.transpose(1, 2), C.transpose(1, 2),
                           delta_bias=at_least_fp32(self.dt_proj.bias), delta_softplus=True)
        gate = torch.sigmoid(z)
        out = y * (z * gate) + (at_least_fp32(self.D)[:, None] * x) * (1 - gate)  # z * sigmoid(z) = silu(z)
        return self.out_proj(out.to(hidden_states.dtype).transpose(1, 2))


class FFN(nn.Module):
    """Position-wise feed-forward: Linear(d_model -> d_ff), activation, dropout, Linear(d_ff ->
    d_model), dropout; (b, t, d_model) -> (b, t, d_model)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation: expected 'gelu' or 'relu', got {activation!r}")
        self.up, self.down = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
        self.act = F.gelu if activation == "gelu" else F.relu
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.dropout(self.act(self.up(x)))))


class BiMambaLayer(nn.Module):
    """Bidirectional Mamba encoder layer over tokens (b, t, d_model) -> (b, t, d_model).

    A forward mixer reads the tokens in order, a backward mixer reads them flipped (its output is
    flipped back). Two documented add-norm arrangements:

    - ``branch_norm=False`` (S-Mamba): x = LN(x + f(x) + flip(g(flip(x)))), then LN(x + FFN(x)).
    - ``branch_norm=True`` (Bi-Mamba+): x = LN_f(x + f(x)) + LN_b(x + flip(g(flip(x)))),
      then LN(x + FFN(x)).
    - ``bidirectional=False`` (SOR-Mamba): x = LN(x + f(x)), then LN(x + FFN(x)).

    Args:
        d_model: token width. make_mixer: () -> module (b, t, d) -> (b, t, d), called twice.
        d_ff: FFN width. dropout: default 0.1. activation: FFN activation, default "gelu".
        branch_norm: see above, default False. bidirectional: default True.
        mixer_dropout: dropout on the mixers' outputs before the add-norm (S-Mamba) or not
            (Bi-Mamba+, whose dropout is in the FFN only), default True.
    """

    def __init__(self, d_model: int, make_mixer: Callable[[], nn.Module], d_ff: int, dropout: float = 0.1,
                 activation: str = "gelu", branch_norm: bool = False, bidirectional: bool = True,
                 mixer_dropout: bool = True):
        super().__init__()
        self.forward_mixer = make_mixer()
        self.backward_mixer = make_mixer() if bidirectional else None
        self.branch_norm = branch_norm
        self.norm_f = nn.LayerNorm(d_model)
        self.norm_b = nn.LayerNorm(d_model) if branch_norm else None
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ff, dropout, activation)
        self.dropout = nn.Dropout(dropout) if mixer_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.dropout(self.forward_mixer(x))
        if self.backward_mixer is None:
            x = self.norm_f(x + f)
        else:
            b = self.dropout(self.backward_mixer(x.flip(1)).flip(1))
            x = self.norm_f(x + f) + self.norm_b(x + b) if self.branch_norm else self.norm_f(x + f + b)
        return self.norm_ffn(x + self.ffn(x))


class MultiScaleMamba(nn.Module):
    """ms-Mamba's multi-scale mixer (Karadag et al., 2025): parallel Mamba-1 mixers whose step
    sizes are scaled by ``scales`` (mixer k draws softplus(dt bias) from [dt_min * s_k,
    dt_max * s_k] at init), outputs averaged; (b, t, d_model) -> (b, t, d_model).

    Args: d_model; scales: step-size factors, default (1, 2, 4); the rest go to Mamba1.
    """

    def __init__(self, d_model: int, scales=(1.0, 2.0, 4.0), dt_min: float = 0.001, dt_max: float = 0.1,
                 **mamba_kwargs):
        super().__init__()
        if not scales or any(not isinstance(s, (int, float)) or s <= 0 for s in scales):
            raise ValueError(f"scales: expected positive numbers, got {scales!r}")
        self.mixers = nn.ModuleList(Mamba1(d_model, dt_min=dt_min * s, dt_max=dt_max * s, **mamba_kwargs)
                                    for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.mixers]).mean(0)


class PooledAttention(nn.Module):
    """Attention Mamba's mixer (b, t, d_model) -> (b, t, d_model): queries and keys are projected,
    then shortened along the feature axis to ``pooled`` entries by adaptive average pooling plus
    adaptive max pooling (summed), which keeps their coarse shape and their peaks at a fraction of
    the cost; values come from a bidirectional Mamba over the tokens (forward mixer + flipped
    backward mixer, summed), so the attention mixes sequence-aware values. Single head, softmax
    over the tokens, scaled by pooled^-0.5, then an output projection.

    Args: d_model; make_mixer: () -> module (b, t, d) -> (b, t, d), called twice (the value
    Mamba's two directions); pooled: pooled query/key width, default d_model // 4 (at least 1);
    dropout on the attention weights, default 0.1.
    """

    def __init__(self, d_model: int, make_mixer: Callable[[], nn.Module], pooled: int | None = None,
                 dropout: float = 0.1):
        super().__init__()
        self.pooled = pooled if pooled is not None else max(1, d_model // 4)
        positive_ints(d_model=d_model, pooled=self.pooled)
        if self.pooled > d_model:
            raise ValueError(f"pooled: expected at most d_model = {d_model}, got {self.pooled}")
        self.query, self.key = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.value_forward, self.value_backward = make_mixer(), make_mixer()
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(t, self.pooled) + F.adaptive_max_pool1d(t, self.pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self._pool(self.query(x)), self._pool(self.key(x))  # (b, t, pooled)
        v = self.value_forward(x) + self.value_backward(x.flip(1)).flip(1)  # (b, t, d_model)
        weights = self.dropout(torch.softmax(q @ k.transpose(1, 2) * self.pooled ** -0.5, dim=-1))
        return self.out(weights @ v)


class SpectralAttention(nn.Module):
    """SpectroMamba's (BV-Mamba's) spectral attention over variable tokens: (b, n, L) series ->
    (b, n, d_model) tokens, from two branches whose outputs are summed.

    - time branch: Linear(L -> D) per variable, then single-head softmax attention across the
      variables (residual).
    - frequency branch: the real FFT of each series, (b, n, L // 2 + 1) complex, through a
      complex Linear (F -> D; real and imaginary weights) to complex queries, keys and values;
      scores softmax(Re(Q K^H) / sqrt(D)) across the variables weigh the complex values; the real
      and imaginary parts of the result are layer-normalised separately, concatenated and
      projected Linear(2 D -> D).

    Args: lookback L; d_model D; dropout on both branches' attention weights, default 0.1.
    """

    def __init__(self, lookback: int, d_model: int, dropout: float = 0.1):
        super().__init__()
        positive_ints(lookback=lookback, d_model=d_model)
        n_freq = lookback // 2 + 1
        self.embed = nn.Linear(lookback, d_model)
        self.time_qkv = nn.Linear(d_model, 3 * d_model)
        self.freq_qkv_re = nn.Linear(n_freq, 3 * d_model, bias=False)
        self.freq_qkv_im = nn.Linear(n_freq, 3 * d_model, bias=False)
        self.norm_re, self.norm_im = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.freq_out = nn.Linear(2 * d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.scale = d_model ** -0.5

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        """series (b, n, L) -> tokens (b, n, d_model)."""
        tokens = self.embed(series)
        q, k, v = self.time_qkv(tokens).chunk(3, dim=-1)
        time = tokens + self.dropout(torch.softmax(q @ k.transpose(1, 2) * self.scale, dim=-1)) @ v
        spectrum = torch.fft.rfft(series, dim=-1)  # (b, n, F) complex
        re, im = spectrum.real, spectrum.imag
        # (re + i im)(W_re + i W_im) = (re W_re - im W_im) + i (re W_im + im W_re)
        qkv_re = self.freq_qkv_re(re) - self.freq_qkv_im(im)
        qkv_im = self.freq_qkv_im(re) + self.freq_qkv_re(im)
        (q_re, k_re, v_re), (q_im, k_im, v_im) = qkv_re.chunk(3, dim=-1), qkv_im.chunk(3, dim=-1)
        scores = (q_re @ k_re.transpose(1, 2) + q_im @ k_im.transpose(1, 2)) * self.scale  # Re(Q K^H)
        weights = self.dropout(torch.softmax(scores, dim=-1))
        freq = self.freq_out(torch.cat([self.norm_re(weights @ v_re), self.norm_im(weights @ v_im)], dim=-1))
        return time + freq


def temporal_mamba(d_model: int, dropout: float = 0.1, **mamba_kwargs) -> Mamba1:
    """MambaTS's temporal Mamba block: a Mamba-1 mixer without the causal convolution (``d_conv=1``,
    a per-channel scale) and with dropout on the Delta/B/C projection's output (``x_proj``
    becomes Linear -> Dropout, so its weight is ``x_proj.0.weight``)."""
    mixer = Mamba1(d_model, d_conv=1, **mamba_kwargs)
    mixer.x_proj = nn.Sequential(mixer.x_proj, nn.Dropout(dropout))
    return mixer


def shortest_path_order(cost: torch.Tensor, steps: int = 5000, seed: int = 0, start_temperature: float = 1.0
                        ) -> list[int]:
    """An order of the n nodes (an open path visiting each once) with a low total of
    cost[i, j] over consecutive (i, j): the asymmetric travelling-salesman path, by simulated
    annealing from the identity order. Moves keep the direction of the untouched edges (the costs
    are asymmetric): move one node elsewhere, or swap two; geometric cooling from
    ``start_temperature`` times the mean cost to 1e-3 of it; the best order seen is returned.
    Deterministic for a given seed. cost: (n, n) float."""
    n = cost.shape[0]
    if cost.dim() != 2 or cost.shape != (n, n):
        raise ValueError(f"cost: expected a square (n, n) matrix, got {tuple(cost.shape)}")
    c = cost.double().tolist()

    def total(order):
        return sum(c[a][b] for a, b in zip(order, order[1:]))

    order = list(range(n))
    if n < 3:
        return min([order, order[::-1]], key=total)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(steps, 4, generator=generator).tolist()
    current = best_cost = total(order)
    best = order[:]
    scale = max(float(cost.abs().mean()), 1e-12) * start_temperature
    for step, (u_move, u_i, u_j, u_accept) in enumerate(draws):
        temperature = scale * (1e-3 ** (step / max(steps - 1, 1)))
        i, j = int(u_i * n), int(u_j * (n - 1))
        j += j >= i  # j != i
        candidate = order[:]
        if u_move < 0.7:
            candidate.insert(j, candidate.pop(i))
        else:
            candidate[i], candidate[j] = candidate[j], candidate[i]
        new = total(candidate)
        if new <= current or u_accept < math.exp((current - new) / temperature):
            order, current = candidate, new
            if new < best_cost:
                best, best_cost = order[:], new
    return best


# How the end of a look-back is padded before patching (by repeating its last value):
# "stride": always by ``stride`` values, as PatchTST (one patch more than the unpadded series has);
# "to-multiple": only up to a multiple of ``stride`` (none when it divides the look-back), as the
# Bi-Mamba+ authors' code does.
PATCH_PADDINGS = ("stride", "to-multiple")


def _end_padding(lookback: int, stride: int, padding: str) -> int:
    if padding not in PATCH_PADDINGS:
        raise ValueError(f"padding: expected one of {PATCH_PADDINGS}, got {padding!r}")
    return stride if padding == "stride" else -lookback % stride


def patch_count(lookback: int, patch_len: int, stride: int, padding: str = "stride") -> int:
    """How many patches :func:`patchify` cuts from a look-back of ``lookback`` steps; checks that
    patch_len and stride are positive ints, the padding is known and the patch fits the look-back."""
    positive_ints(patch_len=patch_len, stride=stride)
    if patch_len > lookback:
        raise ValueError(f"patch_len: expected at most lookback = {lookback}, got {patch_len}")
    return (lookback + _end_padding(lookback, stride, padding) - patch_len) // stride + 1


def patchify(x: torch.Tensor, patch_len: int, stride: int, padding: str = "stride") -> torch.Tensor:
    """Patches of each series, the end padded by repeating the last value (``padding``, see
    PATCH_PADDINGS): x (b, n, L) -> (b, n, patch_count(L, patch_len, stride, padding), patch_len),
    a view of the padded series."""
    pad = _end_padding(x.shape[-1], stride, padding)
    x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.unfold(-1, patch_len, stride)


def spearman(series: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation matrix (n, n) of the columns of series (t, n) (ties broken by
    order of appearance)."""
    ranks = series.argsort(0).argsort(0).double()
    ranks = ranks - ranks.mean(0)
    cov = ranks.T @ ranks
    norm = cov.diagonal().sqrt()
    return cov / norm[:, None] / norm[None, :]


def sra_decider(train: torch.Tensor, threshold: float = 0.6) -> bool:
    """Bi-Mamba+'s series-relation-aware decider: True (channel mixing) when the variables of the
    training split are strongly related, False (channel independence) otherwise.

    With rho the Spearman correlations of the distinct variable pairs, the rule (our reading of
    the paper) is: mix when #(rho >= threshold) / #(rho >= 0) >= 1 - threshold.

    Args: train (t, n) float, n >= 2; threshold in (0, 1), default 0.6.
    """
    if not isinstance(train, torch.Tensor) or train.dim() != 2 or train.shape[1] < 2:
        raise ValueError(f"train: expected a (t, n) tensor with n >= 2 variables, got {getattr(train, 'shape', train)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a value in (0, 1), got {threshold!r}")
    n = train.shape[1]
    rho = spearman(train)[torch.triu_indices(n, n, 1).unbind()]
    positive = int((rho >= 0).sum())
    return positive > 0 and int((rho >= threshold).sum()) / positive >= 1 - threshold
