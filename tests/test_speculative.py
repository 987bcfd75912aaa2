import copy

import pytest
import torch

from mambakit.speculative import SpeculativeStats, speculative_generate
from tests.fixtures import ATTN_CFG, tiny_model

PROMPT = [3, 1, 4, 1, 5, 9, 2]
NEW = 13  # not a multiple of k + 1 for any k tested


def lm(kind, seed=0, hybrid=False, **overrides):
    """A random float64 2-layer model over 256 tokens."""
    return tiny_model(kind, hybrid, seed=seed, **{"n_layer": 2, "vocab_size": 256, **overrides})


def perturbed(model, scale, seed=1):
    """A copy of ``model`` with N(0, scale) noise on every weight: a draft that mostly agrees."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return other


def greedy(model, ids, n, **kwargs):
    return model.generate(ids, max_new_tokens=n, temperature=0, **kwargs)


@pytest.mark.parametrize("prompt_len", [1, 7])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("kind", ["mamba1", "mamba2", "mamba3"])
def test_matches_greedy_decoding_of_the_target(kind, k, prompt_len):
    target = lm(kind)
    ids = torch.tensor([PROMPT[:prompt_len]])
    expected = greedy(target, ids, NEW)

    other = lm("mamba2" if kind != "mamba2" else "mamba1", seed=1, d_model=16)
    out, stats = speculative_generate(target, other, ids, max_new_tokens=NEW, k=k)
    assert out.dtype == torch.int64 and torch.equal(out, expected)
    assert stats.generated == NEW

    out, stats = speculative_generate(target, target, ids, max_new_tokens=NEW, k=k)
    assert torch.equal(out, expected)
    assert stats.acceptance_rate == 1.0 and stats.accepted == stats.drafted
    assert stats.rounds == -(-NEW // (k + 1))  # k accepted + 1 bonus token per round


@pytest.mark.parametrize("kind", ["mamba1", "mamba3"])
@pytest.mark.parametrize("d_conv", [0, 4])
def test_hybrid_with_attention_matches_greedy(kind, d_conv):
    attn = dict(ATTN_CFG, d_conv=d_conv)  # d_conv > 0: the attention layer also has a conv state to roll back
    target = lm(kind, hybrid=True, attn_cfg=attn)
    ids = torch.tensor([PROMPT])
    expected = greedy(target, ids, NEW)
    drafts = [lm("mamba2", seed=1, hybrid=True, attn_cfg=attn), perturbed(target, 0.005), target]
    for draft in drafts:
        for k in (2, 4):
            out, stats = speculative_generate(target, draft, ids, max_new_tokens=NEW, k=k)
            assert torch.equal(out, expected)
    assert stats.acceptance_rate == 1.0


def round_by_round(target, draft, prompt, n, k):
    """The rounds without any cache (every step a full forward of the whole sequence): the list of
    accepted counts j per round, and the tokens."""
    seq, js = list(prompt), []
    with torch.no_grad():
        while len(seq) < len(prompt) + n:
            m = min(k, max(len(prompt) + n - len(seq) - 1, 1))
            drafts = greedy(draft, [seq], m)[0][len(seq):]
            logits = target(torch.tensor([seq + drafts]))[0, len(seq) - 1:, :256]
            choices = logits.float().argmax(-1).tolist()
            j = 0
            while j < m and drafts[j] == choices[j]:
                j += 1
            js.append(j)
            seq += drafts[:j] + [choices[j]]
    return js, seq[: len(prompt) + n]


@pytest.mark.parametrize("kind,hybrid", [("mamba2", False), ("mamba3", True)])
def test_rollback_restores_both_caches(kind, hybrid):
    target = lm(kind, hybrid=hybrid)
    ids = torch.tensor([PROMPT])
    n, k = 32, 4
    # A random draft: nearly every draft token is rejected.
    out, stats = speculative_generate(target, lm("mamba1", seed=2), ids, max_new_tokens=n, k=k)
    assert torch.equal(out, greedy(target, ids, n))
    assert stats.accepted < stats.drafted
    # A draft that mostly agrees: every kind of draft rollback (to a saved state j = 0 or 0 < j < k - 1,
    # none for j = k - 1, pending = [d_k, c] for j = k). A wrongly restored draft cache would change the
    # draft's proposals and so the accepted counts, which must be those of the cache-free rounds.
    draft = perturbed(target, 0.005)
    js, tokens = round_by_round(target, draft, PROMPT, n, k)
    assert {0, k - 1, k}.issubset(js) and any(0 < j < k - 1 for j in js)
    out, stats = speculative_generate(target, draft, ids, max_new_tokens=n, k=k)
    assert out[0].tolist() == tokens
    assert stats.rounds == len(js) and stats.accepted == sum(js)
    assert 0 < stats.acceptance_rate < 1
    assert stats.tokens_per_round == n / len(js)


def test_eos_stops_like_generate():
    target = lm("mamba2")
    ids = torch.tensor([PROMPT])
    free = greedy(target, ids, NEW)[0].tolist()
    eos = free[len(PROMPT) + 5]
    expected = greedy(target, ids, NEW, eos_token_id=eos)
    for draft in (target, lm("mamba1", seed=1)):
        out, stats = speculative_generate(target, draft, ids, max_new_tokens=NEW, k=3, eos_token_id=eos)
        assert torch.equal(out, expected) and out[0, -1] == eos
        assert stats.generated == out.shape[1] - len(PROMPT) < NEW


def test_no_new_tokens_and_int32_input():
    target = lm("mamba1")
    ids = torch.tensor([PROMPT], dtype=torch.int32)
    out, stats = speculative_generate(target, target, ids, max_new_tokens=0)
    assert out.dtype == torch.int64 and out.tolist() == [PROMPT]
    assert stats == SpeculativeStats() and stats.acceptance_rate == 0.0 and stats.tokens_per_round == 0.0
    out, _ = speculative_generate(target, lm("mamba2", seed=1), ids, max_new_tokens=1, k=4)
    assert torch.equal(out, greedy(target, ids.long(), 1))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(input_ids=torch.tensor([PROMPT, PROMPT])), ValueError, "input_ids"),
        (dict(input_ids=torch.tensor([PROMPT[:3]]).float()), TypeError, "input_ids"),
        (dict(input_ids=[PROMPT]), TypeError, "input_ids"),
        (dict(input_ids=torch.tensor([[1, 256]])), ValueError, "input_ids"),
        (dict(input_ids=torch.tensor([[1, -1]])), ValueError, "input_ids"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.int64)), ValueError, "input_ids"),
        (dict(k=0), ValueError, "k"),
        (dict(k=2.0), ValueError, "k"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=True), ValueError, "max_new_tokens"),
        (dict(eos_token_id=256), ValueError, "eos_token_id"),
        (dict(draft=lm("mamba1", seed=1, vocab_size=300)), ValueError, "draft"),
        (dict(draft=torch.nn.Linear(2, 2)), TypeError, "draft"),
        (dict(target="mamba"), TypeError, "target"),
    ],
)
def test_bad_inputs(change, error, match):
    model = lm("mamba1")
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    kwargs = {**dict(target=model, draft=model, input_ids=torch.tensor([PROMPT]), max_new_tokens=4, k=2), **change}
    with pytest.raises(error, match=f"^{match}:"):
        speculative_generate(**kwargs)
    assert not calls  # raised before any model call
