"""Greedy speculative decoding (MambaByte-style): a small draft model proposes k tokens, the target
model checks them all in one parallel forward, and the longest agreeing prefix is kept.

Each round: the draft decodes d_1..d_k greedily; the target runs once on [x_p, d_1..d_k] (x_p the
last committed token), giving its own greedy choices t_1..t_{k+1}; the round commits the j leading
draft tokens with d_i == t_i, then t_{j+1} (the target's correction, or a bonus token when all k
agree). Every committed token is the target's greedy choice, so the output equals plain greedy
decoding of the target alone (:func:`mambakit.generation.generate` with ``temperature=0``); the
draft only sets the speed.

Invariant at the start of a round: each model's cache has absorbed every committed token except a
short list of its own (``target_pending``, ``draft_pending``) that ends with the last committed
token x_p.

Rollback. A recurrent state cannot be unwound token by token, so the caches are rolled back by
snapshot. Before verifying, the target's recurrent states are cloned; the verification forward
runs over target_pending + drafts; after a rejection the clone is restored and the accepted tokens
and the correction join ``target_pending``, to be absorbed by the next round's verification
forward (one target forward per round, never a separate re-absorbing pass). The draft keeps clones
of its states after each of its own forwards and restores the one that has absorbed x_p,
d_1..d_j. Attention layers keep a key/value buffer indexed by position: moving ``seqlen_offset``
back is enough there (stale entries are overwritten), and only their causal-conv state, if any,
is cloned.

Batch size 1 and greedy decoding only. Both models should be in eval mode (the caller's business,
as for :func:`~mambakit.generation.generate`); everything runs under ``torch.inference_mode()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import InferenceCache
from .layers import MHA
from .models import MambaLM


@dataclass
class SpeculativeStats:
    """Counts of one :func:`speculative_generate` call.

    Attributes:
        rounds: draft-then-verify rounds, each one target forward (after the prompt prefill).
        drafted: draft tokens proposed, each one draft forward.
        accepted: draft tokens the target agreed with.
        generated: tokens added to the prompt.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0.0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """generated / rounds (0.0 when there was no round)."""
        return self.generated / self.rounds if self.rounds else 0.0


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(target, draft, input_ids, max_new_tokens, k, eos_token_id) -> None:
    for name, model in (("target", target), ("draft", draft)):
        if not isinstance(model, MambaLM):
            raise TypeError(f"{name}: expected a MambaLM, got {type(model).__name__}")
    vocab = target.config.vocab_size
    if draft.config.vocab_size != vocab:
        raise ValueError(f"draft: vocab_size {draft.config.vocab_size} differs from the target's {vocab}")
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected an int tensor of shape (1, l), got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids: expected an int64/int32 tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected shape (1, l) with l >= 1 (batch size 1), got {tuple(input_ids.shape)}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids: token ids outside [0, {vocab})")
    if not _is_count(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not _is_count(k) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if eos_token_id is not None and (not _is_count(eos_token_id) or not 0 <= eos_token_id < vocab):
        raise ValueError(f"eos_token_id: expected None or an int in [0, {vocab}), got {eos_token_id!r}")


def _rollback_tensors(model: MambaLM, cache: InferenceCache) -> list[torch.Tensor]:
    """The cache tensors a rollback restores: all states of the Mamba layers, and the conv state (if
    any) of attention layers, whose key/value buffer (their first state) is indexed by position."""
    tensors = []
    for i, layer in enumerate(model.backbone.layers):
        states = cache.states[i]
        tensors.extend(states[1:] if isinstance(layer.mixer, MHA) else states)
    return tensors


def _snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _restore(tensors: list[torch.Tensor], snapshot: list[torch.Tensor]) -> None:
    for t, saved in zip(tensors, snapshot):
        t.copy_(saved)


class _Runner:
    """A model with its cache: ``absorb`` runs tokens through from the cached states and returns
    their greedy next tokens."""

    def __init__(self, model: MambaLM, max_seqlen: int):
        self.model = model
        self.vocab = model.config.vocab_size
        self.device = next(model.parameters()).device
        self.cache = model.allocate_inference_cache(1, max_seqlen)
        self.tensors = _rollback_tensors(model, self.cache)

    def absorb(self, tokens: list[int], num_last_tokens: int = 0) -> list[int]:
        """tokens (n ints) -> greedy choices after each of the last ``num_last_tokens`` (all if 0),
        by generate's rule (argmax of the float32 logits over the real vocabulary)."""
        ids = torch.tensor([tokens], dtype=torch.int64, device=self.device)
        logits = self.model(ids, inference_params=self.cache, num_last_tokens=num_last_tokens)[0]
        self.cache.seqlen_offset += len(tokens)
        return logits[:, : self.vocab].float().argmax(dim=-1).tolist()


@torch.inference_mode()
def speculative_generate(target, draft, input_ids, max_new_tokens: int = 32, k: int = 4,
                         eos_token_id: int | None = None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Greedy decoding of ``target``, sped up by ``draft`` proposing ``k`` tokens per round.

    Args:
        target: the :class:`~mambakit.MambaLM` whose greedy output is produced.
        draft: a (smaller) :class:`~mambakit.MambaLM` with the same vocabulary size; any mix of
            layers, the target itself included.
        input_ids: (1, l) int tensor, l >= 1.
        max_new_tokens: tokens to add (fewer when ``eos_token_id`` is produced).
        k: draft tokens per round (the last round drafts fewer when fewer tokens are left).
        eos_token_id: stop once the target produces it (it is kept in the output).

    Returns:
        ((1, l + n) int64 tokens on input_ids' device, equal to
        ``generate(target, input_ids, max_new_tokens, temperature=0, eos_token_id=...)``, stats).
    """
    _check(target, draft, input_ids, max_new_tokens, k, eos_token_id)
    prompt = input_ids[0].tolist()
    stats = SpeculativeStats()
    out: list[int] = []
    if max_new_tokens > 0:
        max_seqlen = len(prompt) + max_new_tokens + k + 1
        big, small = _Runner(target, max_seqlen), _Runner(draft, max_seqlen)
        if len(prompt) > 1:  # a one-token prompt leaves both caches at offset 0 with zero states
            big.absorb(prompt[:-1], num_last_tokens=1)
            small.absorb(prompt[:-1], num_last_tokens=1)
        target_pending, draft_pending = prompt[-1:], prompt[-1:]
        while True:
            m = min(k, max(max_new_tokens - len(out) - 1, 1))  # no more drafts than tokens still wanted
            # Draft: d_1 from its pending tokens, then m - 1 single steps; saves[j] = its states having
            # absorbed x_p, d_1..d_j.
            base = small.cache.seqlen_offset + len(draft_pending)
            drafts = small.absorb(draft_pending, num_last_tokens=1)
            saves = []
            for _ in range(m - 1):
                saves.append(_snapshot(small.tensors))
                drafts += small.absorb(drafts[-1:])
            # Verify all m drafts in one target forward (which also absorbs the target's pending tokens).
            offset, saved = big.cache.seqlen_offset, _snapshot(big.tensors)
            choices = big.absorb(target_pending + drafts, num_last_tokens=m + 1)
            j = 0
            while j < m and drafts[j] == choices[j]:
                j += 1
            committed = drafts[:j] + [choices[j]]
            stats.rounds += 1
            stats.drafted += m
            stats.accepted += j
            if eos_token_id is not None and eos_token_id in committed:
                committed = committed[: committed.index(eos_token_id) + 1]
            out += committed[: max_new_tokens - len(out)]
            if len(out) == max_new_tokens or out[-1] == eos_token_id:
                break
            c = committed[-1]
            if j == m:  # the target holds x_p, d_1..d_m; the draft x_p, d_1..d_{m-1}
                target_pending, draft_pending = [c], [drafts[-1], c]
            else:
                _restore(big.tensors, saved)
                big.cache.seqlen_offset = offset
                target_pending = target_pending + drafts[:j] + [c]
                if j < m - 1:  # j == m - 1: the draft has absorbed exactly x_p, d_1..d_{m-1} already
                    _restore(small.tensors, saves[j])
                small.cache.seqlen_offset = base + j
                draft_pending = [c]
    stats.generated = len(out)
    new = torch.tensor([out], dtype=torch.int64, device=input_ids.device)
    return torch.cat([input_ids.long(), new], dim=1), stats
