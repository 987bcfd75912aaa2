"""Chunk machinery shared by the SSD and Mamba-3 references."""

from .chunked import chunked_state_space, recurrent_state_space, segsum
from .decay import decay_exp
from .segments import canonical_segments, segment_resets

__all__ = ["canonical_segments", "chunked_state_space", "decay_exp", "recurrent_state_space", "segment_resets",
           "segsum"]
