import math

import pytest
import torch

from mambakit.cache import InferenceCache
from mambakit.layers import MHA, Block, GatedMLP, RMSNorm

F64 = torch.float64


def naive_attention(mha: MHA, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out per head, rotary by complex multiplication (GPT-NeoX halves)."""
    b, l, _ = x.shape
    hd, nh, nkv = mha.head_dim, mha.num_heads, mha.num_heads_kv
    qkv = x @ mha.in_proj.weight.T + mha.in_proj.bias
    q = qkv[..., : nh * hd].reshape(b, l, nh, hd)
    k = qkv[..., nh * hd : (nh + nkv) * hd].reshape(b, l, nkv, hd)
    v = qkv[..., (nh + nkv) * hd :].reshape(b, l, nkv, hd)
    r = mha.rotary_emb_dim
    if r:
        half = r // 2
        freqs = torch.tensor([mha.rotary_emb_base ** (-2 * i / r) for i in range(half)], dtype=F64)
        turn = torch.polar(torch.ones(l, half, dtype=F64), torch.arange(l, dtype=F64)[:, None] * freqs)

        def rot(t):
            z = torch.complex(t[..., :half], t[..., half:r]) * turn[None, :, None, :]
            return torch.cat([z.real, z.imag, t[..., r:]], dim=-1)

        q, k = rot(q), rot(k)
    out = torch.zeros(b, l, nh, hd, dtype=F64)
    for head in range(nh):
        kv_head = head // (nh // nkv)
        scores = q[:, :, head] @ k[:, :, kv_head].transpose(1, 2) / math.sqrt(hd)
        if mha.causal:
            scores = scores.masked_fill(torch.ones(l, l, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, head] = torch.softmax(scores, -1) @ v[:, :, kv_head]
    return out.reshape(b, l, nh * hd) @ mha.out_proj.weight.T + mha.out_proj.bias


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param(dict(num_heads=4, causal=True), id="causal"),
        pytest.param(dict(num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=6), id="gqa-rotary"),
        pytest.param(dict(num_heads=2, causal=False, rotary_emb_dim=16), id="bidirectional-full-rotary"),
    ],
)
def test_mha_matches_written_out_attention(kwargs):
    torch.manual_seed(0)
    mha = MHA(32, **kwargs).to(F64)
    x = torch.randn(2, 9, 32, dtype=F64)
    assert (mha(x) - naive_attention(mha, x)).abs().max().item() < 1e-12


def test_mha_decoding_with_rows_of_different_lengths():
    torch.manual_seed(1)
    mha = MHA(32, num_heads=4, causal=True, rotary_emb_dim=8, layer_idx=0, d_conv=3).to(F64)
    a, b = torch.randn(1, 7, 32, dtype=F64), torch.randn(1, 4, 32, dtype=F64)
    cache = InferenceCache(max_batch_size=2, max_seqlen=10)
    cache.states[0] = mha.allocate_inference_cache(2, 10, dtype=F64)
    mha(a[:, :5], inference_params=cache.rows(0, 1))
    mha(b[:, :2], inference_params=cache.rows(1, 2))
    cache.seqlen_offset, cache.lengths = 5, torch.tensor([5, 2])
    outs = []
    for t in range(2):
        step = torch.cat([a[:, 5 + t : 6 + t], b[:, 2 + t : 3 + t]])
        outs.append(mha(step, inference_params=cache))
        cache.advance()
    with torch.no_grad():
        assert (outs[1][0] - mha(a)[0, 6]).abs().max() < 1e-12
        assert (outs[1][1] - mha(b)[0, 3]).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_mha_static_shape_cache_decodes_like_the_full_forward(causal):
    """The CUDA-graph cache: key/value positions from a device tensor advanced in place, the whole
    buffer read with a mask. Rows of different lengths, prefill then one-token steps."""
    torch.manual_seed(4)
    mha = MHA(32, num_heads=4, num_heads_kv=2, causal=causal, rotary_emb_dim=8, layer_idx=0, d_conv=3).to(F64)
    a, b = torch.randn(1, 9, 32, dtype=F64), torch.randn(1, 6, 32, dtype=F64)
    cache = InferenceCache(max_batch_size=2, max_seqlen=16, static_shapes=True,
                           lengths=torch.zeros(2, dtype=torch.long))
    cache.states[0] = mha.allocate_inference_cache(2, 16, dtype=F64)
    with torch.no_grad():
        mha(a[:, :5], inference_params=cache.rows(0, 1))
        mha(b[:, :2], inference_params=cache.rows(1, 2))
        cache.lengths.copy_(torch.tensor([5, 2]))
        cache.seqlen_offset = 5
        lengths = cache.lengths
        outs = []
        for t in range(4):
            step = torch.cat([a[:, 5 + t : 6 + t], b[:, 2 + t : 3 + t]])
            outs.append(mha(step, inference_params=cache))
            cache.advance()
        assert cache.lengths is lengths and cache.lengths.tolist() == [9, 6]
        for t in range(4):
            if causal:  # each token saw exactly its own row's prefix
                assert (outs[t][0] - mha(a[:, : 6 + t])[0, -1]).abs().max() < 1e-12
                assert (outs[t][1] - mha(b[:, : 3 + t])[0, -1]).abs().max() < 1e-12
            else:  # each token saw all of its own row so far, nothing of the other row's buffer
                assert (outs[t][0] - mha(a[:, : 6 + t])[0, -1]).abs().max() < 1e-12


def test_mha_bad_arguments():
    with pytest.raises(ValueError, match="num_heads_kv"):
        MHA(32, num_heads=4, num_heads_kv=3)
    with pytest.raises(ValueError, match="rotary_emb_dim"):
        MHA(32, num_heads=4, rotary_emb_dim=5)
    with pytest.raises(ValueError, match="hidden_states"):
        MHA(32, num_heads=4)(torch.randn(2, 3, 16))


def test_gated_mlp():
    torch.manual_seed(2)
    mlp = GatedMLP(24, hidden_features=50, multiple_of=16).to(F64)
    assert mlp.fc1.weight.shape == (128, 24) and mlp.fc2.weight.shape == (24, 64)
    x = torch.randn(3, 24, dtype=F64)
    h = x @ mlp.fc1.weight.T
    expected = (h[:, :64] * torch.nn.functional.silu(h[:, 64:])) @ mlp.fc2.weight.T
    assert (mlp(x) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_block_is_prenorm_residual(residual_in_fp32):
    torch.manual_seed(3)
    mixer, mlp = torch.nn.Linear(16, 16), GatedMLP(16, hidden_features=32, multiple_of=32)

    def call(x, inference_params=None):
        return mixer(x)

    mixer_module = torch.nn.Module()
    mixer_module.forward = call
    block = Block(16, mixer_module, mlp, norm_cls=lambda d: RMSNorm(d), residual_in_fp32=residual_in_fp32).to(torch.bfloat16)
    mixer.to(torch.bfloat16)
    x, residual = torch.randn(2, 5, 16, dtype=torch.bfloat16), torch.randn(2, 5, 16, dtype=torch.bfloat16)
    out, new_residual = block(x, residual)
    r1 = x.float() + residual.float() if residual_in_fp32 else x + residual
    h = mixer(block.norm(r1.to(torch.bfloat16)))
    r2 = (h.float() + r1) if residual_in_fp32 else h + r1
    assert new_residual.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    assert torch.allclose(new_residual.float(), r2.float(), atol=1e-2)
    assert torch.allclose(out.float(), mlp(block.norm2(r2.to(torch.bfloat16))).float(), atol=1e-2)
