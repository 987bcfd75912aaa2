"""Multi-head self-attention for hybrid stacks; parameter names as the official ``mamba_ssm`` ``MHA``
(fused ``in_proj`` for q, k, v and an optional gated-MLP slice, optional causal conv, ``out_proj``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.conv1d import causal_conv1d
from .projection import project


def rotary_tables(positions: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    """cos, sin of shape (*positions.shape, dim // 2) for rotary embeddings of width ``dim``."""
    exact = torch.float64 if dtype == torch.float64 else torch.float32  # angles grow with position
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=exact) / dim))
    angles = positions.to(exact)[..., None] * inv_freq
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of x (b, l, heads, d); cos, sin (b, l, d_rot / 2).

    ``interleaved``: pairs (2i, 2i + 1) (GPT-J); otherwise pairs (i, i + d_rot / 2) (GPT-NeoX).
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half :]
    cos, sin = cos[:, :, None], sin[:, :, None]
    if interleaved:
        first, second = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)
    else:
        first, second = rot[..., :half], rot[..., half:]
        rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


class MHA(nn.Module):
    """Multi-head (grouped-query) self-attention through ``F.scaled_dot_product_attention``.

    Args (official names): embed_dim; num_heads; num_heads_kv (GQA, default num_heads);
    head_dim (default embed_dim // num_heads); mlp_dim (a gated MLP computed from the same
    in_proj, rounded up to a multiple of 256); qkv_proj_bias; out_proj_bias; softmax_scale
    (default head_dim ** -0.5); causal (default False, as the official module: hybrid LM configs
    set it); layer_idx; d_conv (causal depthwise conv on q, k, v; 0 = none); rotary_emb_dim
    (0 = no rotary); rotary_emb_base; rotary_emb_interleaved.

    Decoding keeps (kv_cache (b, max_seqlen, 2, heads_kv, head_dim)[, conv_state]) per layer.
    """

    def __init__(self, embed_dim, num_heads, num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,
                 out_proj_bias=True, softmax_scale=None, causal=False, layer_idx=None, d_conv=0, rotary_emb_dim=0,
                 rotary_emb_base=10000.0, rotary_emb_interleaved=False, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.layer_idx, self.causal = embed_dim, layer_idx, causal
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if num_heads % self.num_heads_kv:
            raise ValueError(f"num_heads_kv: must divide num_heads = {num_heads}, got {self.num_heads_kv}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"num_heads: must divide embed_dim = {embed_dim} when head_dim is not given, got {num_heads}")
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        if rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"rotary_emb_dim: expected an even number <= head_dim = {self.head_dim}, got {rotary_emb_dim}")
        self.softmax_scale = softmax_scale
        self.d_conv = d_conv
        self.rotary_emb_dim, self.rotary_emb_base, self.rotary_emb_interleaved = rotary_emb_dim, rotary_emb_base, rotary_emb_interleaved
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(embed_dim, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=d_conv, padding=d_conv - 1, groups=qkv_dim, **factory)
        self.out_proj = nn.Linear(self.head_dim * self.num_heads + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        dtype = dtype if dtype is not None else self.out_proj.weight.dtype
        device = self.out_proj.weight.device
        kv = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, dtype=dtype, device=device)
        if self.d_conv == 0:
            return (kv,)
        return kv, torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv - 1, dtype=dtype, device=device)

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"hidden_states: expected shape (b, l, {self.embed_dim}), got {tuple(hidden_states.shape)}")
        b, l, _ = hidden_states.shape
        cache = inference_params
        state = None
        if cache is not None:
            if self.layer_idx not in cache.states:
                cache.states[self.layer_idx] = self.allocate_inference_cache(b, cache.max_seqlen, dtype=hidden_states.dtype)
            state = cache.states[self.layer_idx]
        continuing = cache is not None and cache.seqlen_offset > 0
        static = cache is not None and cache.static_shapes  # no host reads: capturable in a CUDA graph
        if static:
            start = cache.lengths  # the caller keeps the lengths within max_seqlen
        elif continuing:
            start = cache.lengths if cache.lengths is not None else torch.full((b,), cache.seqlen_offset, device=hidden_states.device)
        else:
            start = torch.zeros(b, dtype=torch.long, device=hidden_states.device)
        if cache is not None and not static and int(start.max()) + l > cache.max_seqlen:
            raise ValueError(f"hidden_states: {l} more tokens exceed the cache's max_seqlen = {cache.max_seqlen}")

        qkv = project(self.in_proj, hidden_states)
        if self.mlp_dim > 0:
            qkv, mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
            up, gate = mlp.chunk(2, dim=-1)
            mlp = up * F.silu(gate)
        if self.d_conv > 0:
            conv_state = state[1] if state is not None else None
            qkv_t, final = causal_conv1d(
                qkv.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias,
                initial_state=conv_state if continuing else None, return_final_state=True,
            )
            qkv = qkv_t.transpose(1, 2)
            if conv_state is not None:
                conv_state.copy_(final)
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim, self.num_heads_kv * self.head_dim], dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_heads_kv, self.head_dim))
        v = v.unflatten(-1, (self.num_heads_kv, self.head_dim))
        positions = start[:, None] + torch.arange(l, device=q.device)  # (b, l)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_tables(positions, self.rotary_emb_dim, self.rotary_emb_base, q.dtype)
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            k = apply_rotary(k, cos, sin, self.rotary_emb_interleaved)

        if cache is None:
            keys, values, mask, is_causal = k, v, None, self.causal
        else:
            kv_cache = state[0]
            rows = torch.arange(b, device=q.device)[:, None]
            kv_cache[rows, positions] = torch.stack([k, v], dim=2).to(kv_cache.dtype)
            total = cache.max_seqlen if static else int(start.max()) + l
            keys, values = kv_cache[:, :total, 0].to(q.dtype), kv_cache[:, :total, 1].to(q.dtype)
            key_pos = torch.arange(total, device=q.device)
            # Each row sees its own keys up to its query position (causal) or all of its own keys.
            limit = positions[:, :, None] if self.causal else (start + l - 1)[:, None, None]
            mask = (key_pos[None, None, :] <= limit)[:, None]  # (b, 1, l, total)
            is_causal = False
        group = self.num_heads // self.num_heads_kv
        if group > 1:
            keys, values = keys.repeat_interleave(group, dim=2), values.repeat_interleave(group, dim=2)
        context = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask, is_causal=is_causal, scale=self.softmax_scale,
        ).transpose(1, 2)
        context = context.flatten(-2)
        if self.mlp_dim > 0:
            context = torch.cat([context, mlp], dim=-1)
        return project(self.out_proj, context)
