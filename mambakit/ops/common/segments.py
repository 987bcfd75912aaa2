"""Packed sequences: where a row's seq_idx changes, a new sequence starts."""

from __future__ import annotations

import torch


def segment_resets(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) ids -> (b, l) bool, True where a new sequence starts (never at t = 0)."""
    resets = torch.zeros_like(seq_idx, dtype=torch.bool)
    resets[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return resets


def canonical_segments(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) ids -> (b, l) int64 ids counting the changes so far (0, 0, 1, 1, 2, ...).

    Counting the changes makes "same id" mean "same packed sequence" even when a row reuses an id
    later (0, 0, 1, 1, 0, 0 is three sequences), and puts the first sequence of each row at 0.
    """
    return segment_resets(seq_idx).long().cumsum(dim=1)
