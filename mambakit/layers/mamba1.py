"""Mamba-1 mixer (MATH.md section 2): in_proj -> causal conv -> selective scan -> out_proj.

Parameter names, shapes and initialisation follow the official ``mamba_ssm`` ``Mamba`` module
(``mamba_ssm/modules/mamba_simple.py``), so state dicts load without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._backend import resolve_backend
from ..ops._checks import grad_needed
from ..ops.common.decay import decay_exp_
from ..ops.conv1d import causal_conv1d, causal_conv1d_update
from ..ops.conv1d.reference import causal_conv1d_update_unchecked
from ..ops.selective_scan import selective_scan
from ..ops.selective_scan.mixer_step import mamba1_mixer_step
from .mixer_common import (
    at_least_fp32,
    cached_states,
    check_hidden_states,
    derived_parameter,
    inverse_softplus_dt,
    state_dtype,
    write_states,
)
from .norm import RMSNorm
from .projection import has_forward_hooks, project

# Batch rows up to which a decode token takes the fused mixer step. Each of its programs reads
# its own copy of the x_proj and dt_proj weight tiles, which costs more than the unfused ops'
# matrix products once the batch is large: on an H200 the fused step decoded 1.2-1.55x faster
# than the unfused ops at batch 1-32 and 0.91x at 64 (benchmarks/results/mamba1_decode_step.md).
FUSED_STEP_MAX_BATCH = 32


class Mamba1(nn.Module):
    """Mamba-1 mixer: (b, l, d_model) -> (b, l, d_model).

    Args (defaults of the official ``Mamba``):
        d_model: model width.
        d_state: SSM state size n, default 16.
        d_conv: causal conv width, default 4.
        expand: d_inner = expand * d_model, default 2.
        dt_rank: rank of the dt projection, "auto" (default) = ceil(d_model / 16).
        dt_min, dt_max: range of softplus(dt bias) at init, default 1e-3 and 0.1.
        dt_init: "random" (default; dt_proj.weight uniform in +-dt_rank^-0.5 * dt_scale) or
            "constant" (all equal to that bound).
        dt_scale: default 1.0. dt_init_floor: lower bound of the initial dt, default 1e-4.
        conv_bias: bias on the conv, default True. bias: biases on in_proj/out_proj, default False.
        inner_norms: RMSNorm on Delta (before dt_proj), B and C, as Jamba's Mamba layers (default
            False; parameters dt_layernorm (dt_rank,), b_layernorm and c_layernorm (d_state,)).
        use_fast_path: accepted for signature compatibility, ignored.
        layer_idx: key of this layer in an :class:`~mambakit.cache.InferenceCache`.
        device, dtype: factory arguments (A_log and D stay float32, as in the official module).

    Parameters: in_proj (2 d_inner, d_model), conv1d (d_inner, 1, d_conv), x_proj
    (dt_rank + 2 n, d_inner), dt_proj (d_inner, dt_rank) + bias (d_inner,), A_log (d_inner, n),
    D (d_inner,), out_proj (d_model, d_inner).

    Example:
        >>> layer = Mamba1(32)
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        inner_norms: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        if not isinstance(self.dt_rank, int) or self.dt_rank <= 0 or self.d_inner <= 0:
            raise ValueError(
                f"dt_rank, expand: expected a positive dt_rank (or 'auto') and expand * d_model >= 1, "
                f"got dt_rank={dt_rank!r}, expand={expand!r}"
            )
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, bias=conv_bias, **factory
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)

        # dt_proj keeps the variance of dt at init; its bias puts softplus(dt) in [dt_min, dt_max].
        bound = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                self.dt_proj.weight.fill_(bound)
            else:
                self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, **factory))
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A[c, j] = -(j + 1), stored as its log in float32.
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.inner_norms = inner_norms
        if inner_norms:
            self.dt_layernorm = RMSNorm(self.dt_rank, eps=1e-6, **factory)
            self.b_layernorm = RMSNorm(d_state, eps=1e-6, **factory)
            self.c_layernorm = RMSNorm(d_state, eps=1e-6, **factory)

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model).

        With an :class:`~mambakit.cache.InferenceCache`, the layer starts from zero states when
        ``seqlen_offset == 0`` and from the cached ones otherwise (any number of tokens), and
        writes its final states back into the cache in place.
        """
        b, _ = check_hidden_states(hidden_states, self.d_model)
        if inference_params is None:
            return self._mix(hidden_states)
        states = cached_states(self, inference_params, b)
        return self._mix(hidden_states, states, resume=inference_params.seqlen_offset > 0)

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decode token (b, 1, d_model) from the given states, which are updated in place.

        Returns (out (b, 1, d_model), conv_state, ssm_state); the same computation as
        :meth:`forward` with a cache, through ``causal_conv1d_update`` and a one-token scan (the
        reference's recurrent form on CPU, the Triton step kernel on CUDA).
        """
        _, l = check_hidden_states(hidden_states, self.d_model)
        if l != 1:
            raise ValueError(f"hidden_states: step takes one token, shape (b, 1, d_model), got l = {l}")
        out = self._mix(hidden_states, (conv_state, ssm_state), resume=True)
        return out, conv_state, ssm_state

    def _mix(self, hidden_states, states=None, resume=False):
        if self._runs_channel_major(hidden_states, resume):
            return self._mix_channel_major(hidden_states, states, resume)
        return project(self.out_proj, self.mix_projected(project(self.in_proj, hidden_states), states, resume))

    def _runs_channel_major(self, hidden_states, resume) -> bool:
        """Whether this call takes :meth:`_mix_channel_major`: on the Triton backend, for more
        than one new token, with plain ``nn.Linear`` projections without forward hooks (it
        multiplies their weights directly) and no inner norms."""
        return (resolve_backend(None, hidden_states.device) == "triton"
                and not (resume and hidden_states.shape[1] == 1)
                and not self.inner_norms
                and type(self.in_proj) is nn.Linear and type(self.out_proj) is nn.Linear
                and not any(map(has_forward_hooks, (self.in_proj, self.x_proj, self.out_proj))))

    def _mix_channel_major(self, hidden_states, states, resume):
        """The mixer with its activations stored channel-major, memory (channels, b l), as the
        official fused layer lays them out: every projection is then one matrix product whose
        output the kernels read in place (time is the unit stride), and autograd's products hand
        back gradients in the same layout. The (b, l, channels) layout of :meth:`mix_projected`
        costs nine transposing copies of a (b, l, d_inner) tensor per training step of a layer.
        """
        b, l, _ = hidden_states.shape
        tokens = hidden_states.reshape(b * l, self.d_model)

        def batch_first(t):  # (channels, b l) -> a (b, channels, l) view
            return t.view(t.shape[0], b, l).transpose(0, 1)

        def channel_major(t):  # (b, channels, l) channel-major -> a (channels, b l) view (a copy otherwise)
            return t.transpose(0, 1).reshape(t.shape[1], b * l)

        xz = _channel_major_linear(self.in_proj.weight, tokens, self.in_proj.bias)  # (2 d_inner, b l)
        x, z = (batch_first(part) for part in xz.split(self.d_inner))
        x, conv_final = self._conv(x, states, resume)
        x_dbl = torch.mm(self.x_proj.weight, channel_major(x))  # (dt_rank + 2 n, b l)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state])
        dt = torch.mm(self.dt_proj.weight, dt)  # (d_inner, b l); the bias goes in the scan
        y = self._scan(x, batch_first(dt), batch_first(B), batch_first(C), z, states, resume, conv_final)
        y = channel_major(y).t()  # (b l, d_inner), a transposed view
        out = torch.mm(y, self.out_proj.weight.t()) if self.out_proj.bias is None else \
            torch.addmm(self.out_proj.bias, y, self.out_proj.weight.t())
        return out.view(b, l, self.d_model)

    def mix_projected(self, projected, states=None, resume=False):
        """The mixer between its projections: in_proj's output (b, l, 2 d_inner) -> the gated
        scan output (b, l, d_inner) that out_proj takes."""
        if resume and projected.shape[1] == 1 and self._steps_fused(projected):
            return self._fused_step(projected[:, 0], states)[:, None]
        if resume and projected.shape[1] == 1 and self._steps_on_cpu(projected, states):
            return self._cpu_step(projected[:, 0], states)[:, None]
        xz = projected.transpose(1, 2)  # (b, 2 d_inner, l)
        x, z = xz.chunk(2, dim=1)
        if resume and x.shape[2] == 1:  # decoding: the one-token conv updates conv_state in place
            conv_state = states[0]
            x = causal_conv1d_update(x[..., 0], conv_state, self.conv1d.weight[:, 0], self.conv1d.bias,
                                     activation=self.activation)[..., None]
            conv_final = conv_state
        else:
            x, conv_final = self._conv(x, states, resume)

        x_dbl = project(self.x_proj, x.transpose(1, 2))  # (b, l, dt_rank + 2 n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.inner_norms:
            dt, B, C = self.dt_layernorm(dt), self.b_layernorm(B), self.c_layernorm(C)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, d_inner, l); bias goes in the scan
        y = self._scan(x, dt, B.transpose(1, 2), C.transpose(1, 2), z, states, resume, conv_final)
        return y.transpose(1, 2)

    def _steps_fused(self, projected) -> bool:
        """Whether a decode token takes :func:`mamba1_mixer_step` (two kernels): on the Triton
        backend, up to FUSED_STEP_MAX_BATCH rows, without autograd, with plain ``nn.Linear``
        x_proj (without forward hooks: the kernel reads its weight) and dt_proj and no inner
        norms."""
        return (projected.shape[0] <= FUSED_STEP_MAX_BATCH
                and resolve_backend(None, projected.device) == "triton"
                and not self.inner_norms
                and type(self.x_proj) is nn.Linear and type(self.dt_proj) is nn.Linear
                and not has_forward_hooks(self.x_proj)
                and not self._records_autograd(projected))

    def _fused_step(self, projected, states):
        """in_proj's output for one token (b, 2 d_inner) -> the gated scan output (b, d_inner),
        the cached states updated in place."""
        conv_state, ssm_state = states
        x, z = projected.split(self.d_inner, dim=-1)
        A, D, dt_bias = self._scan_parameters()
        return mamba1_mixer_step(x, z, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, self.x_proj.weight,
                                 self.dt_proj.weight, dt_bias, A, D, ssm_state)

    def _steps_on_cpu(self, projected, states) -> bool:
        """Whether a decode token takes :meth:`_cpu_step`: float32 activations and states on the
        reference backend, without autograd and inner norms."""
        return (resolve_backend(None, projected.device) == "reference"
                and projected.dtype == torch.float32 and states[1].dtype == torch.float32
                and not self.inner_norms and not self._records_autograd(projected))

    def _records_autograd(self, projected) -> bool:
        """Whether autograd would record this token's ops (the parameters are only walked with
        grad mode on)."""
        return torch.is_grad_enabled() and grad_needed(projected, *self.parameters())

    def _cpu_step(self, projected, states):
        """in_proj's output for one token (b, 2 d_inner) -> the gated scan output (b, d_inner), as
        the unfused ops compute it, with the SSM state updated in place and none of the scan op's
        general machinery: ~30 small ops a layer were most of a CPU token outside the products."""
        conv_state, ssm_state = states
        x, z = projected.split(self.d_inner, dim=-1)
        # The cache and the layer's own weights have the shapes the checks would confirm.
        x = causal_conv1d_update_unchecked(x, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias,
                                           self.activation)
        dt, B, C = project(self.x_proj, x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A, D, dt_bias = self._scan_parameters()
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, dt_bias))  # (b, d_inner)
        ssm_state.mul_(decay_exp_(dt[..., None] * A)).add_((dt * x)[..., None] * B[:, None, :])
        y = torch.matmul(ssm_state, C[..., None])[..., 0] + D * x
        return y * F.silu(z)

    def _scan_parameters(self):
        """(A = -exp(A_log), D, dt_proj's bias), at least float32, remembered while the three
        parameters are unchanged (:func:`derived_parameter`; one check for all three: a decode token
        asks for them in every layer)."""
        return derived_parameter(self, "scan", lambda: (-torch.exp(at_least_fp32(self.A_log)), at_least_fp32(self.D),
                                                        at_least_fp32(self.dt_proj.bias)),
                                 self.A_log, self.D, self.dt_proj.bias)

    def _conv(self, x, states, resume):
        """Causal conv + SiLU of x (b, d_inner, l) -> (its output, the conv's final state or None
        without a cache)."""
        keep = states is not None
        conv = causal_conv1d(
            x,
            self.conv1d.weight[:, 0],
            self.conv1d.bias,
            activation=self.activation,
            initial_state=states[0] if resume else None,
            return_final_state=keep,
        )
        return conv if keep else (conv, None)

    def _scan(self, x, dt, B, C, z, states, resume, conv_final):
        """The selective scan of x, dt (b, d_inner, l) with B, C (b, n, l) gated by z; with a cache,
        the final conv and scan states are written into it. -> y (b, d_inner, l)."""
        keep = states is not None
        A, D, dt_bias = self._scan_parameters()
        scan = selective_scan(
            x,
            dt,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=dt_bias,
            delta_softplus=True,
            initial_state=states[1] if resume else None,
            return_final_state=keep,
            # The reference (CPU) path only; the kernels ignore it. Without autograd the token loop
            # was 1.3-2.6x faster than the chunked scan at 130M-class sizes on 2 cores; with a
            # backward to follow, the chunked scan is (2.6x at l = 1024).
            algorithm="chunked" if torch.is_grad_enabled() else "recurrent",
        )
        y, ssm_final = scan if keep else (scan, None)
        if keep:
            write_states(states, (conv_final, ssm_final))
        return y

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero states (conv_state (b, d_inner, d_conv - 1) in ``dtype`` or the conv weight's dtype,
        ssm_state (b, d_inner, d_state) float32, float64 for a float64 model)."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(
            batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype(dtype or self.dt_proj.weight.dtype)
        )
        return conv_state, ssm_state


def _channel_major_linear(weight, tokens, bias=None):
    """``weight`` (out, in) applied to tokens (N, in) -> (out, N), channel-major: the transpose of
    ``F.linear``'s output. Autograd's matrix-product backward keeps each operand's layout, so the
    gradient of tokens comes back (N, in) contiguous."""
    if bias is None:
        return torch.mm(weight, tokens.t())
    return torch.addmm(bias[:, None], weight, tokens.t())
