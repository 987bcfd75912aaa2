"""One-token decoding through CUDA graphs: a model's decode forward is captured once per batch size
(and, with attention layers, per key/value length bucket), with its own inference cache, and
replayed for every later token and every later call.

A decode step of a 130M-class model launches a few hundred small kernels; replaying them as one
graph removes the per-kernel launch cost that bounds eager decoding at batch 1. The graph reads
and writes fixed buffers: the token input, the logits output and the cache states (every layer
updates its states in place, so their storage never changes). Attention layers take their
static-shape path (:attr:`InferenceCache.static_shapes`): they read the whole key/value buffer,
masked past each row's length, which the cache keeps as a device tensor advanced in place. MoE
layers route with host-side counts and are not captured; :func:`graph_supported` says whether a
model is.
"""

from __future__ import annotations

import weakref

import torch

from .cache import InferenceCache
from .layers.attention import MHA
from .layers.mamba1 import Mamba1
from .layers.mamba2 import Mamba2
from .layers.mamba3 import Mamba3
from .ops.norm.api import fused_add_norm_on_auto

GRAPH_MIXERS = (Mamba1, Mamba2, Mamba3, MHA)
# Attention graphs are captured for key/value buffers of a power-of-two length, at least this long:
# a decode step attends over the whole buffer, so a bucket trades recaptures against masked work.
MIN_KV_BUCKET = 256


def graph_supported(model) -> bool:
    """Whether every layer of ``model`` (a MambaLM) can run its decode step inside a CUDA graph:
    Mamba-1, Mamba-2, Mamba-3 or attention mixers, and plain (non-MoE) MLPs."""
    from .layers.moe import MoE

    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if layers is None:
        return False
    return all(isinstance(block.mixer, GRAPH_MIXERS) and not isinstance(block.mlp, MoE) for block in layers)


class _Captured:
    """One batch size (and key/value length): the cache, the token input (b, 1), the logits output
    (b, vocab) and the graph."""

    def __init__(self, model, batch: int, max_seqlen: int, pool):
        device = next(model.parameters()).device
        self.cache: InferenceCache = model.allocate_inference_cache(batch, max_seqlen)
        self.cache.static_shapes = True
        self.cache.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache.seqlen_offset = 1  # a continuation: the layers take their one-token path
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        # The same kernels in the warm-up (which compiles and autotunes them) and in the capture;
        # in a graph, the fused add + norm saves launches at no host cost.
        with fused_add_norm_on_auto():
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):
                    model(self.tokens, inference_params=self.cache, num_last_tokens=1)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool), torch.no_grad():
                self.logits = model(self.tokens, inference_params=self.cache, num_last_tokens=1)[:, -1]
        self.cache.reset()


class GraphedDecoder:
    """CUDA-graph decode steps for one model, captured lazily per batch size.

    ``cache(b, max_seqlen)`` gives the (reset) inference cache the graph for batch b was captured
    with: prefill into it eagerly (or through ``step``), advance it (:meth:`InferenceCache.advance`)
    after every token, and ``step(tokens)`` replays the decode graph and returns the logits
    (b, padded vocab) for the next position. The returned logits are the graph's output buffer,
    overwritten by the next step. Models without attention size nothing by max_seqlen and keep
    one graph per batch size.
    """

    def __init__(self, model):
        if not graph_supported(model):
            raise ValueError("model: CUDA-graph decoding takes models of Mamba-1/2/3 and attention layers without MoE")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"model: CUDA-graph decoding needs a model on a CUDA device, got {device}")
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, int], _Captured] = {}
        self.has_attention = any(isinstance(m, MHA) for m in model.modules())
        self.weights = _weights_fingerprint(model)
        self.active: _Captured | None = None

    def valid_for(self, model) -> bool:
        """Whether the captured graphs still match ``model``'s current weights: a ``.to()`` or a
        replaced parameter moves them, and an in-place update (an optimizer step) changes values
        the layers derive once for decoding (such as A = -exp(A_log)); either means re-capture."""
        return model is self.model and _weights_fingerprint(model) == self.weights

    def cache(self, batch: int, max_seqlen: int = 1) -> InferenceCache:
        bucket = max(MIN_KV_BUCKET, 1 << (max_seqlen - 1).bit_length()) if self.has_attention else 1
        if (batch, bucket) not in self.captured:
            self.captured[batch, bucket] = _Captured(self.model, batch, bucket, self.pool)
        self.active = self.captured[batch, bucket]
        self.active.cache.reset()
        return self.active.cache

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b,) of the batch size of the last ``cache(b)`` -> logits (b, padded vocab)."""
        if self.active is None or tokens.shape != (self.active.tokens.shape[0],):
            raise ValueError("tokens: expected shape (b,) of the batch size of the last cache(b) call")
        self.active.tokens[:, 0].copy_(tokens)
        self.active.graph.replay()
        return self.active.logits


def _weights_fingerprint(model) -> tuple:
    return tuple((p.data_ptr(), p.dtype, tuple(p.shape), p._version) for p in model.parameters())


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def graphed_decoder(model) -> GraphedDecoder:
    """The model's GraphedDecoder, made on first use and remade when its weights moved (held
    beside the model, not on it, so copying or pickling the model never touches a graph)."""
    decoder = _DECODERS.get(model)
    if decoder is None or not decoder.valid_for(model):
        decoder = GraphedDecoder(model)
        _DECODERS[model] = decoder
    return decoder
