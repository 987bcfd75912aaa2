"""Mamba-3 mixer (MATH.md section 4): in_proj -> Mamba-3 op (SISO or MIMO) -> out_proj.

Parameter names, shapes and initialisation follow the official ``mamba_ssm`` ``Mamba3`` module
(``mamba_ssm/modules/mamba3.py``), so state dicts load without renaming. Conventions taken from
it: the rotary layout is interleaved pairs (2j, 2j + 1) for SISO and halves (j, j + n/2) for MIMO
(its TileLang kernel); one set of n_angles angles per token is shared by all heads; B and C are
RMS-normalised over n before the op adds B_bias/C_bias and rotates them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.mamba3 import mamba3, mamba3_step
from .mixer_common import at_least_fp32, cached_states, check_hidden_states, inverse_softplus_dt, state_dtype, write_states
from .norm import RMSNormGated
from .projection import project


class Mamba3(nn.Module):
    """Mamba-3 mixer: (b, l, d_model) -> (b, l, d_model).

    in_proj splits into [z, x, B, C, dd_dt, dd_A, trap, angles] with widths
    [d_inner, d_inner, r g n, r g n, h, h, h, n_angles] (r = mimo_rank if is_mimo else 1).

    Args (defaults of the official ``Mamba3``):
        d_model: model width.
        d_state: n, default 128. expand: d_inner = expand * d_model, default 2.
        headdim: p, default 64 (must divide d_inner). ngroups: g, B/C groups, default 1 (must
            divide the heads).
        rope_fraction: 0.5 (default) or 1.0; n_angles = floor(d_state * rope_fraction / 2).
        dt_min, dt_max, dt_init_floor: dt bias init, softplus(dt_bias) in [dt_min, dt_max].
        A_floor: A = min(-softplus(dd_A), -A_floor), default 1e-4.
        is_outproj_norm: gated RMSNorm (groups of headdim, norm before gate) on the output instead
            of the silu(z) gate inside the op, default False.
        is_mimo: MIMO with rank mimo_rank (default 4), default False.
        chunk_size: chunk length of the op, default 64.
        dropout, n_layer, **kwargs: absorbed and ignored, as by the official module.
        layer_idx: key of this layer in an :class:`~mambakit.cache.InferenceCache`.
        device, dtype: factory arguments (dt_bias, B_bias, C_bias, D and mimo_* stay float32,
            as in the official module).

    Example:
        >>> layer = Mamba3(32, d_state=16, headdim=16)
        >>> layer(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        is_outproj_norm: bool = False,
        is_mimo: bool = False,
        mimo_rank: int = 4,
        chunk_size: int = 64,
        dropout: float = 0.0,
        layer_idx: int | None = None,
        n_layer: int | None = None,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("d_model", d_model), ("d_state", d_state), ("headdim", headdim),
                            ("ngroups", ngroups), ("mimo_rank", mimo_rank), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction: expected 0.5 or 1.0, got {rope_fraction!r}")
        self.d_model = d_model
        self.d_state = d_state
        self.expand = expand
        self.headdim = headdim
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.A_floor = A_floor
        self.is_outproj_norm = is_outproj_norm
        self.is_mimo = is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.d_inner = int(expand * d_model)
        if self.d_inner <= 0 or self.d_inner % headdim:
            raise ValueError(f"headdim: expected a divisor of d_inner = {self.d_inner}, got {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"ngroups: expected a divisor of the number of heads {self.nheads}, got {ngroups}")
        self.num_bc_heads = ngroups
        self.rotary_dim_divisor = int(2 / rope_fraction)
        self.split_tensor_size = int(d_state * rope_fraction) // 2 * 2
        self.num_rope_angles = self.split_tensor_size // 2
        if self.num_rope_angles == 0:
            raise ValueError(
                f"d_state: expected d_state * rope_fraction >= 2 (at least one rotary angle), got {d_state}"
            )
        self.rope_layout = "halves" if is_mimo else "interleaved"

        r, h, n = self.mimo_rank, self.nheads, d_state
        d_in_proj = 2 * self.d_inner + 2 * n * ngroups * r + 3 * h + self.num_rope_angles
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=False, **factory)

        dt_bias = inverse_softplus_dt(h, dt_min, dt_max, dt_init_floor, device=device, dtype=torch.float32)
        self.dt_bias = nn.Parameter(dt_bias)
        self.dt_bias._no_weight_decay = True
        self.B_bias = nn.Parameter(torch.ones(h, r, n, dtype=torch.float32, device=device))
        self.C_bias = nn.Parameter(torch.ones(h, r, n, dtype=torch.float32, device=device))
        self.B_norm = RMSNormGated(n, eps=1e-5, **factory)
        self.C_norm = RMSNormGated(n, eps=1e-5, **factory)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.full((h, r, headdim), 1.0 / r, device=device))
            self.mimo_z = nn.Parameter(torch.ones(h, r, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.full((h, r, headdim), 1.0 / r, device=device))
        self.D = nn.Parameter(torch.ones(h, device=device))
        self.D._no_weight_decay = True
        if is_outproj_norm:
            self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=True, group_size=headdim, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)

    def forward(self, hidden_states: torch.Tensor, inference_params=None, *,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model).

        seq_idx: optional (b, l) int ids of sequences packed in one row; state, phase and the
        previous-token term restart wherever it changes (the cache, if any, continues the row's
        last sequence).
        With an :class:`~mambakit.cache.InferenceCache` the layer starts from zero states when
        ``seqlen_offset == 0`` and from the cached ones otherwise (any number of tokens), and
        writes its final states back into the cache in place.
        """
        b, _ = check_hidden_states(hidden_states, self.d_model)
        if inference_params is None:
            return self._mix(hidden_states, seq_idx=seq_idx)
        states = cached_states(self, inference_params, b)
        return self._mix(hidden_states, states, resume=inference_params.seqlen_offset > 0, seq_idx=seq_idx)

    def step(self, hidden_states, angle_state, ssm_state, k_state, v_state):
        """One decode token (b, 1, d_model) from the given states, which are updated in place.

        Returns (out (b, 1, d_model), angle_state, ssm_state, k_state, v_state); the same
        computation as :meth:`forward` with a cache.
        """
        _, l = check_hidden_states(hidden_states, self.d_model)
        if l != 1:
            raise ValueError(f"hidden_states: step takes one token, shape (b, 1, d_model), got l = {l}")
        states = (angle_state, ssm_state, k_state, v_state)
        out = self._mix(hidden_states, states, resume=True)
        return (out, *states)

    def _mix(self, hidden_states, states=None, resume=False, seq_idx=None):
        return project(self.out_proj, self.mix_projected(project(self.in_proj, hidden_states), states, resume, seq_idx))

    def mix_projected(self, projected, states=None, resume=False, seq_idx=None):
        """The mixer between its projections: in_proj's output (b, l, d_in_proj) -> the gated
        (and normed) output (b, l, d_inner) that out_proj takes, in the input's dtype."""
        b, l, _ = projected.shape
        r, g, h, p, n = self.mimo_rank, self.num_bc_heads, self.nheads, self.headdim, self.d_state
        proj = projected
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
            proj, [self.d_inner, self.d_inner, r * g * n, r * g * n, h, h, h, self.num_rope_angles], dim=-1
        )
        z = z.reshape(b, l, h, p)
        x = x.reshape(b, l, h, p)
        B = self.B_norm(B.reshape(b, l, r, g, n))
        C = self.C_norm(C.reshape(b, l, r, g, n))
        A = torch.clamp(-F.softplus(at_least_fp32(dd_A)), max=-self.A_floor)
        dt = F.softplus(dd_dt + self.dt_bias)
        angles = at_least_fp32(angles)[:, :, None, :].expand(b, l, h, self.num_rope_angles)

        keep = states is not None
        gate_in_op = not self.is_outproj_norm
        if keep and resume and l == 1 and seq_idx is None:
            return self._decode_token(x, dt, A, B, C, trap, angles, z, states, gate_in_op)

        res = mamba3(
            x, dt, A, B, C, trap, angles,
            D=self.D,
            z=z if gate_in_op else None,
            B_bias=self.B_bias,
            C_bias=self.C_bias,
            mimo_x=self.mimo_x if self.is_mimo else None,
            mimo_z=self.mimo_z if self.is_mimo and gate_in_op else None,
            # With the output norm, each rank is normed before mimo_o mixes them: the ranks unmixed.
            mimo_o=self.mimo_o if self.is_mimo and gate_in_op else None,
            initial_state=tuple(states) if keep and resume else None,
            return_final_state=keep,
            chunk_size=self.chunk_size,
            rope_layout=self.rope_layout,
            seq_idx=seq_idx,
        )
        y, final = res if keep else (res, None)
        if self.is_mimo and not gate_in_op:
            y = self._norm_and_mix_ranks(y, z)
        else:
            y = y.reshape(b, l, self.d_inner)
            if not gate_in_op:
                y = self.norm(y, z.reshape(b, l, self.d_inner))
        if keep:
            write_states(states, final)
        return y.to(x.dtype)

    def _norm_and_mix_ranks(self, y_ranks, z):
        """Output norm of each rank, gated by z * mimo_z, then mixed by mimo_o: the ranks' outputs
        (b, l, h, r, p) and z (b, l, h, p) -> (b, l, d_inner)."""
        b, l, _, r, _ = y_ranks.shape
        y_r = y_ranks.transpose(2, 3).reshape(b, l, r, self.d_inner)
        z_r = (at_least_fp32(z)[:, :, None] * self.mimo_z.transpose(0, 1)).reshape(b, l, r, self.d_inner)
        y_r = self.norm(at_least_fp32(y_r), z_r).reshape(b, l, r, self.nheads, self.headdim)
        return torch.einsum("blrhp,hrp->blhp", y_r, self.mimo_o.to(y_r.dtype)).reshape(b, l, self.d_inner)

    def _decode_token(self, x, dt, A, B, C, trap, angles, z, states, gate_in_op):
        """One cached token through :func:`~mambakit.ops.mamba3.mamba3_step` (the Triton kernel on
        CUDA), which updates ``states`` in place; inputs as :meth:`mix_projected` split them, with
        l = 1. Returns (b, 1, d_inner) in x's dtype."""
        b = x.shape[0]
        mimo = self.is_mimo
        y = mamba3_step(
            x[:, 0], dt[:, 0], A[:, 0], B[:, 0], C[:, 0], trap[:, 0], angles[:, 0], tuple(states),
            D=self.D, z=z[:, 0] if gate_in_op else None, B_bias=self.B_bias, C_bias=self.C_bias,
            mimo_x=self.mimo_x if mimo else None, mimo_z=self.mimo_z if mimo and gate_in_op else None,
            mimo_o=self.mimo_o if mimo and gate_in_op else None, rope_layout=self.rope_layout,
        )
        if mimo and not gate_in_op:  # y: the ranks unmixed, (b, h, r, p)
            y = self._norm_and_mix_ranks(y[:, None], z)
        else:
            y = y.reshape(b, 1, self.d_inner)
            if not gate_in_op:
                y = self.norm(y, z.reshape(b, 1, self.d_inner))
        return y.to(x.dtype)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero states, the official layout (and the op's :class:`~mambakit.ops.Mamba3State`):
        angle_state (b, h, n_angles) and ssm_state (b, h, p, n) float32 (float64 for a float64
        model), k_state (b, r, h, n) and v_state (b, h, p) in ``dtype`` or the in_proj dtype."""
        device = self.in_proj.weight.device
        act_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        f = state_dtype(act_dtype)
        h, p, n = self.nheads, self.headdim, self.d_state
        return (
            torch.zeros(batch_size, h, self.num_rope_angles, device=device, dtype=f),
            torch.zeros(batch_size, h, p, n, device=device, dtype=f),
            torch.zeros(batch_size, self.mimo_rank, h, n, device=device, dtype=act_dtype),
            torch.zeros(batch_size, h, p, device=device, dtype=act_dtype),
        )
