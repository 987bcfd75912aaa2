"""Chunk machinery shared by the SSD and Mamba-3 references."""

from .chunked import chunked_state_space, recurrent_state_space, segment_resets, segsum

__all__ = ["chunked_state_space", "recurrent_state_space", "segment_resets", "segsum"]
