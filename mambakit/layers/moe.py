"""Mixture of experts: a softmax router sends each token to its top-k of E SwiGLU experts.

Used in place of the dense MLP of a block: Switch (top-1) layers for MoE-Mamba, top-2 over 16
experts for Jamba. Dispatch goes through fixed-size per-expert buffers, so all experts run as
two batched matmuls:

- capacity: while training, expert e takes at most C = ceil(capacity_factor * k * T / E) of the
  T tokens' assignments, first-choice assignments before second choices, earlier tokens first;
  an assignment past that is dropped (its weight contributes nothing; a token whose every
  assignment is dropped passes through the block's residual unchanged). In eval mode nothing is
  dropped (C = T), so a prefill and token-by-token decoding give the same outputs.
- weights: top-1 uses the router probability itself (Switch), which keeps the router in the
  gradient; top-k > 1 renormalises the k chosen probabilities to sum to 1 (Mixtral, Jamba).
- load balancing (Switch Transformer, eq. 4): aux_loss = E * sum_e f_e * P_e, with f_e the fraction
  of the k * T assignments that chose expert e (before capacity) and P_e the mean router
  probability of e; 1 when balanced. The layer keeps the last forward's value in ``aux_loss``
  (scaled by ``aux_loss_coef``) and its routing statistics in ``last_load`` / ``last_dropped``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoE(nn.Module):
    """Top-k routed SwiGLU experts; (b, l, d_model) -> (b, l, d_model).

    Args:
        d_model: token width.
        num_experts: E, default 16.
        top_k: experts per token, default 2 (1 = Switch).
        hidden_features: each expert's inner size, default int(8 * d_model / 3), rounded up to a
            multiple of ``multiple_of`` (as :class:`~mambakit.layers.GatedMLP`, so one expert has
            the parameters of the dense MLP it replaces).
        capacity_factor: buffer slots per expert relative to a perfectly even split, default 1.25.
        aux_loss_coef: weight of the load-balancing loss, default 0.01.
        multiple_of: rounding of the inner size, default 128.

    Parameters: router (E, d_model); fc1 (E, d_model, 2 hidden) [value | gate]; fc2 (E, hidden,
    d_model).
    """

    def __init__(self, d_model: int, num_experts: int = 16, top_k: int = 2, hidden_features: int | None = None,
                 capacity_factor: float = 1.25, aux_loss_coef: float = 0.01, multiple_of: int = 128,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k),
                            ("multiple_of", multiple_of)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k: expected at most num_experts = {num_experts}, got {top_k}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor: expected a number > 0, got {capacity_factor!r}")
        if not aux_loss_coef >= 0:
            raise ValueError(f"aux_loss_coef: expected a number >= 0, got {aux_loss_coef!r}")
        factory = {"device": device, "dtype": dtype}
        hidden = hidden_features if hidden_features is not None else int(8 * d_model / 3)
        hidden = -(-hidden // multiple_of) * multiple_of
        self.d_model, self.num_experts, self.top_k, self.hidden = d_model, num_experts, top_k, hidden
        self.capacity_factor, self.aux_loss_coef = capacity_factor, aux_loss_coef
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        # Each expert initialised as an nn.Linear of its shape would be (uniform, bound 1/sqrt(fan_in)).
        self.fc1 = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden, **factory).uniform_(-1, 1)
                                / math.sqrt(d_model))
        self.fc2 = nn.Parameter(torch.empty(num_experts, hidden, d_model, **factory).uniform_(-1, 1)
                                / math.sqrt(hidden))
        self.aux_loss = None
        self.last_load = None
        self.last_dropped = None

    def capacity(self, n_tokens: int, per_expert: torch.Tensor) -> int:
        """Buffer slots per expert: the training capacity, or in eval mode the largest number of
        assignments any expert received (``per_expert`` (E,) counts), so that none is dropped."""
        if not self.training:
            return max(1, int(per_expert.max()))
        return max(1, math.ceil(self.capacity_factor * self.top_k * n_tokens / self.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (b, l, d_model) -> (b, l, d_model); sets ``aux_loss``, ``last_load`` (E,)
        and ``last_dropped`` (fraction of assignments dropped)."""
        if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
            got = getattr(hidden_states, "dtype", type(hidden_states).__name__)
            raise TypeError(f"hidden_states: expected a float tensor, got {got}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states: expected (b, l, {self.d_model}), got {tuple(hidden_states.shape)}")
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, self.d_model)  # (T, d)
        n_tokens, n_experts, k = tokens.shape[0], self.num_experts, self.top_k
        logits = self.router(tokens)
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (T, E), >= fp32
        weights, experts = probs.topk(k, dim=-1)  # (T, k)
        if k > 1:
            weights = weights / weights.sum(-1, keepdim=True)

        # Assignments in priority order: all first choices (token order), then all second choices...
        experts_flat = experts.t().reshape(-1)  # (k T,)
        token_flat = torch.arange(n_tokens, device=tokens.device).repeat(k)
        one_hot = F.one_hot(experts_flat, n_experts)  # (k T, E)
        slot = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place in its expert's queue
        per_expert = one_hot.sum(0)
        capacity = self.capacity(n_tokens, per_expert)
        kept = slot < capacity

        load = per_expert.to(probs.dtype) / (k * n_tokens)  # f_e
        self.aux_loss = self.aux_loss_coef * n_experts * (load * probs.mean(0)).sum()
        self.last_load = load.detach()
        self.last_dropped = 1.0 - kept.float().mean().detach()

        # Dropped assignments write to (and read from) one spare row past the experts' slots, so
        # every shape here is fixed by T (no data-dependent indexing).
        spare = n_experts * capacity
        row = torch.where(kept, experts_flat * capacity + slot, spare)
        buffer = tokens.new_zeros(spare + 1, self.d_model).index_copy_(0, row, tokens[token_flat])
        value, gate = torch.bmm(buffer[:spare].view(n_experts, capacity, -1), self.fc1).chunk(2, dim=-1)
        expert_out = torch.bmm(value * F.silu(gate), self.fc2).view(spare, -1)
        expert_out = torch.cat([expert_out, expert_out.new_zeros(1, self.d_model)])
        scale = (weights.t().reshape(-1) * kept)[:, None].to(expert_out.dtype)
        out = expert_out.new_zeros(n_tokens, self.d_model).index_add_(0, token_flat, expert_out[row] * scale)
        return out.view(shape)
