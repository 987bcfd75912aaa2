"""Generation: prefill through the parallel path, then one token at a time from the cached states.

Prompts of different lengths are prefilled row by row straight into their rows of one batched
cache (recurrent states need no padding, and attention layers track each row's length), then
decoded together; each prompt therefore gives what it gives alone.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from .cache import InferenceCache

# Prompts up to this many tokens are prefilled through the CUDA-graph decode step rather than the
# chunked forward. A 130M-class model on an H100 (benchmarks/NOTES.md): the eager forward of a
# short prompt costs ~40 ms of kernel launches on the host at batch 1 and 64, a graph step 0.55 ms
# (batch 1) to 1.5 ms (batch 64); the two cross near 30 tokens at batch 64 and 70 at batch 1.
GRAPH_PREFILL_MAX_TOKENS = 32


def _check_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if not isinstance(min_p, (int, float)) or not 0 <= min_p < 1:
        raise ValueError(f"min_p: expected a number in [0, 1), got {min_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty: expected a number > 0, got {repetition_penalty!r}")


def _prompts(input_ids, vocab_size: int, device) -> tuple[list[torch.Tensor], bool]:
    """-> (list of 1-D int64 prompts on device, whether the input was a tensor)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected an int tensor of shape (b, l) with l >= 1, got {input_ids.dtype} {tuple(input_ids.shape)}")
        prompts = list(input_ids.to(device=device, dtype=torch.int64))
        as_tensor = True
    elif (isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)) and len(input_ids) > 0
          and all(isinstance(p, Sequence) and not isinstance(p, (str, bytes)) for p in input_ids)):
        if any(len(p) == 0 for p in input_ids):
            raise ValueError("input_ids: every prompt needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for p in input_ids for t in p):
            raise ValueError("input_ids: expected lists of int token ids")
        prompts = [torch.tensor(list(p), dtype=torch.int64, device=device) for p in input_ids]
        as_tensor = False
    else:
        raise TypeError("input_ids: expected an int tensor (b, l) or a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if int(p.min()) < 0 or int(p.max()) >= vocab_size:
            raise ValueError(f"input_ids: prompt {i} has token ids outside [0, {vocab_size})")
    return prompts, as_tensor


def sample_next_token(logits: torch.Tensor, seen: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next token of every row.

    Args:
        logits: (b, V) float scores.
        seen: (b, V) bool, tokens already in each row (prompt and output), for the penalty.
        temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p.
        min_p: drop tokens whose probability is below min_p times the most likely one's.
        repetition_penalty: seen tokens' positive logits are divided by it, negative ones
            multiplied (the CTRL / transformers rule).
        generator: random source for sampling.

    Returns: (b,) int64 token ids.
    """
    if temperature == 0 and (repetition_penalty == 1.0 or seen is None):
        return logits.argmax(dim=-1)  # the same choice in any float dtype: no upcast copy
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min_p > 0:
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p * sorted_probs.sum(-1, keepdim=True), 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def stream_generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                    eos_token_id: int | None = None, seed: int | None = None,
                    generator: torch.Generator | None = None, max_length: int | None = None,
                    cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yield the (b,) next tokens of every row, one step at a time (finished rows repeat
    ``eos_token_id``). Arguments as :func:`generate`."""
    _check_options(max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty)
    if cuda_graph not in (None, True, False):
        raise TypeError(f"cuda_graph: expected None, True or False, got {cuda_graph!r}")
    vocab = model.config.vocab_size
    if eos_token_id is not None and not 0 <= eos_token_id < vocab:
        raise ValueError(f"eos_token_id: expected an id in [0, {vocab}), got {eos_token_id}")
    device = next(model.parameters()).device
    prompts, _ = _prompts(input_ids, vocab, device)
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if max_length is not None and longest + max_new_tokens > max_length:
        raise ValueError(f"input_ids: a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds max_length {max_length}")
    if max_new_tokens == 0:
        return
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    b = len(prompts)
    from .cuda_graphs import graph_supported, graphed_decoder

    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and graph_supported(model)
    if cuda_graph:
        decoder = graphed_decoder(model)  # raises for a CPU model or layers it cannot capture
        cache: InferenceCache = decoder.cache(b, longest + max_new_tokens)
    else:
        cache = model.allocate_inference_cache(b, longest + max_new_tokens)
    ragged = len(set(lengths)) > 1
    if ragged:
        logits = torch.cat([model(p[None], inference_params=cache.rows(i, i + 1), num_last_tokens=1)[:, -1]
                            for i, p in enumerate(prompts)])
        row_lengths = torch.tensor(lengths, device=device)
        if cache.lengths is None:
            cache.lengths = row_lengths
        else:  # a graph's cache: its lengths tensor is read by the captured graph
            cache.lengths.copy_(row_lengths)
        cache.seqlen_offset = longest
    elif cuda_graph and longest <= GRAPH_PREFILL_MAX_TOKENS:
        # A short prompt goes through the captured decode step token by token: the same
        # recurrence, without the host cost of launching the chunked kernels.
        batch_prompts = torch.stack(prompts)
        for t in range(longest):
            logits = decoder.step(batch_prompts[:, t])
            cache.advance()
    else:
        logits = model(torch.stack(prompts), inference_params=cache, num_last_tokens=1)[:, -1]
        cache.advance(longest)
    # Only what the options use is tracked: every extra op is a launch per token, and reading
    # `finished` back is a device sync that stalls the queue of work (so it happens only with an eos).
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, p] = True
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    padded_vocabulary = logits.shape[-1] > vocab
    for step in range(max_new_tokens):
        if padded_vocabulary:
            logits[:, vocab:] = float("-inf")  # padded vocabulary rows are never produced
        tokens = sample_next_token(logits, seen, temperature, top_k, top_p, min_p, repetition_penalty, generator)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(finished, eos_token_id)
            finished |= tokens == eos_token_id
        yield tokens
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
            return
        if seen is not None:
            seen[torch.arange(b, device=device), tokens] = True
        logits = decoder.step(tokens) if cuda_graph else model(tokens[:, None], inference_params=cache)[:, -1]
        cache.advance()


def generate(model, input_ids, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             min_p: float = 0.0, repetition_penalty: float = 1.0, eos_token_id: int | None = None,
             seed: int | None = None, generator: torch.Generator | None = None,
             streamer: Callable[[torch.Tensor], None] | None = None, max_length: int | None = None,
             cuda_graph: bool | None = None):
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a :class:`mambakit.MambaLM` (anything with ``config.vocab_size``,
            ``allocate_inference_cache`` and ``forward(input_ids, inference_params, num_last_tokens)``).
        input_ids: (b, l) int tensor, or a list of token-id lists of any lengths.
        max_new_tokens: tokens to add (a row stops early at ``eos_token_id``).
        temperature, top_k, top_p, min_p, repetition_penalty: see :func:`sample_next_token`;
            temperature 0 is greedy decoding.
        eos_token_id: stop a row once it produces this id.
        seed / generator: the random source for sampling (a seed makes runs repeatable).
        streamer: called with the (b,) new tokens after every step, as they are produced.
        max_length: refuse prompts whose length + max_new_tokens exceeds it.
        cuda_graph: decode through CUDA graphs captured once per batch size and reused across calls
            (:mod:`mambakit.cuda_graphs`); None (default) does so for a CUDA model of Mamba-1/2/3
            and attention layers (no MoE); True requires it; False decodes eagerly.
            With graphs, prompts of equal length up to ``GRAPH_PREFILL_MAX_TOKENS`` (32) tokens are
            also fed through the graph, one token per replay.

    Returns:
        For a tensor input, (b, l + n) int64 with finished rows padded by ``eos_token_id``; for a
        list input, a list of token-id lists (prompt followed by its generated tokens, up to and
        including its eos).
    """
    steps = []
    for tokens in stream_generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, min_p,
                                  repetition_penalty, eos_token_id, seed, generator, max_length, cuda_graph):
        if streamer is not None:
            streamer(tokens)
        steps.append(tokens)
    if isinstance(input_ids, torch.Tensor):
        new = torch.stack(steps, dim=1).to(input_ids.device) if steps else input_ids.new_zeros(input_ids.shape[0], 0)
        return torch.cat([input_ids.long(), new], dim=1)
    out = []
    for i, prompt in enumerate(input_ids):
        row = list(prompt)
        for tokens in steps:
            token = int(tokens[i])
            row.append(token)
            if token == eos_token_id:
                break
        out.append(row)
    return out
