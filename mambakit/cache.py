"""The inference cache: one object per model holding every layer's recurrent state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class InferenceCache:
    """Per-layer decoding state, preallocated with fixed shapes and updated in place.

    Attributes:
        max_batch_size: rows the states were allocated for.
        max_seqlen: the longest prompt + generation this cache serves (attention layers size
            their key/value buffers with it; recurrent layers need no more than their state).
        seqlen_offset: tokens already absorbed. 0 means the next forward is a prefill (it starts
            from zero states and writes its final states here); > 0 means the next forward
            continues from the stored states.
        states: layer_idx -> tuple of state tensors, as the layer's
            ``allocate_inference_cache`` returned them.
        lengths: (batch,) int64 tokens absorbed by each row when rows differ (batches of prompts
            of different lengths); None means every row has absorbed ``seqlen_offset`` tokens.
            Only attention layers need it (their key/value positions); recurrent layers ignore it.
        static_shapes: a cache for CUDA-graph capture: ``lengths`` is always a (batch,) device
            tensor, advanced in place, and attention layers read their whole key/value buffer
            (masked past each row's length) instead of sizing it from host-side values.
    """

    max_batch_size: int
    max_seqlen: int
    seqlen_offset: int = 0
    states: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    lengths: torch.Tensor | None = None
    static_shapes: bool = False

    def rows(self, start: int, stop: int) -> "InferenceCache":
        """A cache over batch rows [start, stop) whose states are views into this one, so that a
        prefill of those rows alone writes straight into the shared tensors."""
        return InferenceCache(
            max_batch_size=stop - start,
            max_seqlen=self.max_seqlen,
            seqlen_offset=self.seqlen_offset,
            states={i: tuple(t[start:stop] for t in ts) for i, ts in self.states.items()},
            lengths=None if self.lengths is None else self.lengths[start:stop],
            static_shapes=self.static_shapes,
        )

    def reset(self) -> None:
        """Zero every state and start again from a prefill."""
        self.seqlen_offset = 0
        if self.static_shapes:
            self.lengths.zero_()
        else:
            self.lengths = None
        for tensors in self.states.values():
            for t in tensors:
                t.zero_()

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (e.g. beams), in place: row i becomes old row index[i]."""
        for tensors in self.states.values():
            for t in tensors:
                t[: index.numel()].copy_(t.index_select(0, index))
        if self.lengths is not None:
            self.lengths[: index.numel()].copy_(self.lengths.index_select(0, index))

    def advance(self, tokens: int = 1) -> None:
        """Record ``tokens`` more absorbed tokens in every row (``lengths`` in place)."""
        self.seqlen_offset += tokens
        if self.lengths is not None:
            self.lengths += tokens
