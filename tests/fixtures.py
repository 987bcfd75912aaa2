"""Tiny models built in code for the model, generation, checkpoint and CLI tests."""

from __future__ import annotations

import torch

from mambakit import MambaConfig, MambaLM

SSM_CFGS = {
    "mamba1": dict(layer="Mamba1", d_state=8),
    "mamba2": dict(layer="Mamba2", d_state=8, headdim=8, chunk_size=4),
    "mamba2-g2": dict(layer="Mamba2", d_state=8, headdim=8, ngroups=2, chunk_size=4),
    "mamba3": dict(layer="Mamba3", d_state=8, headdim=8, chunk_size=4),
    "mamba3-mimo": dict(layer="Mamba3", d_state=8, headdim=8, chunk_size=4, is_mimo=True, mimo_rank=2),
}
ATTN_CFG = dict(num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=4)


def tiny_config(kind: str = "mamba2", hybrid: bool = False, **overrides) -> MambaConfig:
    fields = dict(d_model=32, n_layer=3, vocab_size=61, ssm_cfg=dict(SSM_CFGS[kind]), pad_vocab_size_multiple=8)
    if hybrid:
        fields.update(attn_layer_idx=[1], attn_cfg=dict(ATTN_CFG), d_intermediate=40)
    fields.update(overrides)
    return MambaConfig(**fields)


def tiny_model(kind: str = "mamba2", hybrid: bool = False, seed: int = 0, dtype=torch.float64, **overrides) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(tiny_config(kind, hybrid, **overrides)).to(dtype)
    # Random (not initial) values everywhere, so that no term can hide behind a zero or a one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" not in name and "dt_bias" not in name and "dt_proj.bias" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
