"""Mamba-2 mixer (MATH.md section 3): in_proj -> causal conv -> SSD -> gated RMSNorm -> out_proj.

Parameter names, shapes and initialisation follow the official ``mamba_ssm`` ``Mamba2`` module
(``mamba_ssm/modules/mamba2.py``), so state dicts load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._backend import resolve_backend
from ..ops.conv1d import causal_conv1d, causal_conv1d_update
from ..ops.norm.linear import fused_kernel_unsupported, gated_rms_norm_linear
from ..ops.ssd import ssd, ssd_step
from .mixer_common import (
    at_least_fp32,
    cached_states,
    check_hidden_states,
    derived_parameter,
    inverse_softplus_dt,
    state_dtype,
    write_states,
)
from .norm import RMSNormGated
from .projection import has_forward_hooks, project


class Mamba2(nn.Module):
    """Mamba-2 mixer: (b, l, d_model) -> (b, l, d_model).

    in_proj splits into [z0, x0, z, xBC, dt] with widths [d_mlp, d_mlp, d_ssm, d_ssm + 2 g n, h]
    (d_mlp = d_inner - d_ssm: a gated MLP beside the SSM when d_ssm < d_inner).

    Args (defaults of the official ``Mamba2``):
        d_model: model width.
        d_state: n, default 128. d_conv: conv width, default 4.
        conv_init: if given, conv weights uniform in +-conv_init.
        expand: d_inner = expand * d_model, default 2. headdim: p, default 64.
        d_ssm: channels that go through the SSM, default d_inner; must be a multiple of headdim.
        ngroups: g, groups of heads sharing B/C, default 1; must divide the heads.
        A_init_range: A = -U(A_init_range), default (1, 16).
        D_has_hdim: D of shape (d_ssm,) instead of (nheads,), default False.
        rmsnorm: gated RMSNorm (groups of d_ssm / ngroups) before out_proj, default True; without
            it the SSD output is gated by silu(z) inside the op.
        norm_before_gate: default False (norm(y * silu(z))).
        dt_min, dt_max, dt_init_floor: dt bias init, softplus(dt_bias) in [dt_min, dt_max].
        dt_limit: clamp of dt after softplus, default (0, inf) (no clamp).
        bias: biases on in_proj/out_proj, default False. conv_bias: default True.
        chunk_size: SSD chunk length, default 256.
        use_mem_eff_path, sequence_parallel: accepted for signature compatibility, ignored.
        process_group: must be None (parallelism is applied from outside the model code).
        layer_idx: key of this layer in an :class:`~mambakit.cache.InferenceCache`.
        device, dtype: factory arguments (D stays float32, as in the official module).

    Example:
        >>> layer = Mamba2(32, d_state=16, headdim=16)
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,
        layer_idx: int | None = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if process_group is not None:
            raise ValueError("process_group: not supported; apply tensor parallelism from outside the module")
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv),
                            ("headdim", headdim), ("ngroups", ngroups), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if not 0 < self.d_ssm <= self.d_inner or self.d_ssm % headdim:
            raise ValueError(
                f"d_ssm: expected a positive multiple of headdim = {headdim} and at most d_inner = "
                f"{self.d_inner}, got {self.d_ssm}"
            )
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups: expected a divisor of the number of heads {self.nheads}, got {ngroups}")
        self.ngroups = ngroups
        lo, hi = A_init_range
        if not 0 < lo <= hi:
            raise ValueError(f"A_init_range: expected 0 < lo <= hi, got {A_init_range!r}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        conv_dim = self.d_ssm + 2 * ngroups * d_state
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=conv_bias, **factory
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, **factory))
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(lo, hi)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(
                self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate, group_size=self.d_ssm // ngroups, **factory
            )
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, inference_params=None, *, seq_idx: torch.Tensor | None = None):
        """hidden_states (b, l, d_model) -> (b, l, d_model).

        seq_idx: optional (b, l) int ids of sequences packed in one row; conv and scan restart
        wherever it changes (the cache, if any, continues the row's last sequence).
        With an :class:`~mambakit.cache.InferenceCache` the layer starts from zero states when
        ``seqlen_offset == 0`` and from the cached ones otherwise (any number of tokens), and
        writes its final states back into the cache in place.
        """
        b, l = check_hidden_states(hidden_states, self.d_model)
        if inference_params is None:
            return self._mix(hidden_states, seq_idx=seq_idx)
        states = cached_states(self, inference_params, b)
        if inference_params.seqlen_offset > 0 and l == 1 and seq_idx is None:  # decoding: the one-token ops
            return self.step(hidden_states, *states)[0]
        return self._mix(hidden_states, states, resume=inference_params.seqlen_offset > 0, seq_idx=seq_idx)

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decode token (b, 1, d_model) from the given states, which are updated in place.

        Returns (out (b, 1, d_model), conv_state, ssm_state); the same computation as
        :meth:`forward` with a cache, through the one-token ops ``causal_conv1d_update`` and
        ``ssd_step`` (Triton kernels for CUDA tensors).
        """
        b, l = check_hidden_states(hidden_states, self.d_model)
        if l != 1:
            raise ValueError(f"hidden_states: step takes one token, shape (b, 1, d_model), got l = {l}")
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        d_mlp = self.d_inner - self.d_ssm
        zxbcdt = project(self.in_proj, hidden_states[:, 0])  # (b, d_in_proj)
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * g * n, h], dim=-1)
        xBC = causal_conv1d_update(
            xBC, conv_state, self.conv1d.weight[:, 0], self.conv1d.bias, activation=self.activation
        )
        x, B, C = torch.split(xBC, [self.d_ssm, g * n, g * n], dim=-1)
        y = ssd_step(
            x.reshape(b, h, p),
            dt,
            derived_parameter(self, "A", lambda: -torch.exp(at_least_fp32(self.A_log)), self.A_log),
            B.reshape(b, g, n),
            C.reshape(b, g, n),
            ssm_state,
            D=self.D.view(h, p) if self.D_has_hdim else self.D,
            z=None if self.rmsnorm else z.reshape(b, h, p),
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
        ).reshape(b, self.d_ssm)
        if self._fuses_output(y, z):
            return self._fused_output(y, z)[:, None], conv_state, ssm_state
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return project(self.out_proj, y)[:, None], conv_state, ssm_state

    def _fuses_output(self, y, z) -> bool:
        """Whether a decode token's gated norm and out_proj run as one kernel
        (:func:`gated_rms_norm_linear`): Triton backend, norm after the gate, no MLP half, plain
        modules without hooks, one dtype, no autocast, and inputs the kernel takes (no autograd, a
        few rows)."""
        if not (self.rmsnorm and not self.norm.norm_before_gate and self.d_inner == self.d_ssm
                and type(self.norm) is RMSNormGated and type(self.out_proj) is nn.Linear
                and not has_forward_hooks(self.norm) and not has_forward_hooks(self.out_proj)
                and resolve_backend(None, y.device) == "triton" and not torch.is_autocast_enabled(y.device.type)
                and y.dtype == z.dtype == self.out_proj.weight.dtype):
            return False
        weight, bias = self.out_proj.weight, self.out_proj.bias
        return fused_kernel_unsupported(y, z, self.norm.weight, weight, bias, self.norm.group_size or self.d_ssm) is None

    def _fused_output(self, y, z):
        """y, z (b, d_ssm) -> out_proj(norm(y, z)) (b, d_model), one kernel."""
        return gated_rms_norm_linear(y, z, self.norm.weight, self.out_proj.weight, self.out_proj.bias,
                                     eps=self.norm.eps, group_size=self.norm.group_size)

    def _mix(self, hidden_states, states=None, resume=False, seq_idx=None):
        return project(self.out_proj, self.mix_projected(project(self.in_proj, hidden_states), states, resume, seq_idx))

    def mix_projected(self, projected, states=None, resume=False, seq_idx=None):
        """The mixer between its projections: in_proj's output (b, l, d_in_proj) -> the gated
        (and normed) output (b, l, d_inner) that out_proj takes."""
        b, l, _ = projected.shape
        gn = self.ngroups * self.d_state
        zxbcdt = projected
        d_mlp = self.d_inner - self.d_ssm
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * gn, self.nheads], dim=-1)
        conv_state, ssm_state = states if states is not None else (None, None)
        keep = states is not None

        # The conv takes xBC as its (b, d, l) transpose; the Triton conv reads that channel-last view
        # in place and returns y in the same layout, so y.transpose(1, 2) is a contiguous
        # (b, l, conv_dim) tensor and x, B, C below are views of it with row stride conv_dim.
        conv = causal_conv1d(
            xBC.transpose(1, 2),
            self.conv1d.weight[:, 0],
            self.conv1d.bias,
            activation=self.activation,
            initial_state=conv_state if resume else None,
            return_final_state=keep,
            seq_idx=seq_idx,
        )
        xBC, conv_final = conv if keep else (conv, None)
        x, B, C = torch.split(xBC.transpose(1, 2), [self.d_ssm, gn, gn], dim=-1)

        D = self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D
        scan = ssd(
            x.reshape(b, l, self.nheads, self.headdim),
            dt,
            -torch.exp(at_least_fp32(self.A_log)),
            B.reshape(b, l, self.ngroups, self.d_state),
            C.reshape(b, l, self.ngroups, self.d_state),
            chunk_size=self.chunk_size,
            D=D,
            z=None if self.rmsnorm else z.reshape(b, l, self.nheads, self.headdim),
            dt_bias=self.dt_bias,
            dt_softplus=True,
            dt_limit=self.dt_limit,
            initial_states=ssm_state if resume else None,
            seq_idx=seq_idx,
            return_final_states=keep,
        )
        y, ssm_final = scan if keep else (scan, None)
        if keep:
            write_states(states, (conv_final, ssm_final))
        y = y.reshape(b, l, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return y

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero states (conv_state (b, d_ssm + 2 g n, d_conv - 1) in ``dtype`` or the conv weight's
        dtype, ssm_state (b, nheads, headdim, d_state) float32, float64 for a float64 model)."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_dim = self.conv1d.weight.shape[0]
        conv_state = torch.zeros(batch_size, conv_dim, self.d_conv - 1, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(
            batch_size, self.nheads, self.headdim, self.d_state, device=device,
            dtype=state_dtype(dtype or self.in_proj.weight.dtype),
        )
        return conv_state, ssm_state
