"""Decay factors exp(x) for log-decays x <= 0, without the slow path of underflowing exp.

x86 exp implementations handle arguments whose result is subnormal or zero on a slow path: in
float32, exp over x in (-104, -87] runs ~40x slower than over normal arguments, -inf ~4x, and
in float64 x = -1000 ~5x. Decays meet such arguments all the time (long decays, -inf masks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# exp(-87) = 1.6e-38, just above float32's smallest normal number (1.2e-38).
FLUSH_BELOW = -87.0
# Results at or below this are flushed to 0: exp(FLUSH_BELOW) with a margin wider than a bfloat16
# rounding step, so that a clamped argument's exp is flushed in every floating dtype.
FLUSH_RESULT = 1.7e-38


def decay_exp(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) for a real tensor, with every value whose result is at most 1.7e-38
    (log_decay <= -86.97, -inf included) set to exactly 0, as flush-to-zero arithmetic would: equal
    to torch.exp to within 1.7e-38, and differentiable the same way (zero gradient there). NaN
    stays NaN. Three passes (clamp, exp, threshold): half the time of a compare-and-select."""
    return F.threshold(torch.exp(log_decay.clamp(min=FLUSH_BELOW)), FLUSH_RESULT, 0.0)


def decay_exp_(log_decay: torch.Tensor) -> torch.Tensor:
    """:func:`decay_exp` in place on ``log_decay`` (no autograd), which it returns: no allocation,
    for decode steps."""
    return F.threshold_(log_decay.clamp_(min=FLUSH_BELOW).exp_(), FLUSH_RESULT, 0.0)
