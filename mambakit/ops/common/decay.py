"""Decay factors exp(x) for log-decays x <= 0, without the slow path of underflowing exp.

x86 exp implementations handle arguments whose result is subnormal or zero on a slow path: in
float32, exp over x in (-104, -87] runs ~40x slower than over normal arguments, -inf ~4x, and
in float64 x = -1000 ~5x. Decays meet such arguments all the time (long decays, -inf masks).
"""

from __future__ import annotations

import torch

# exp(-87) = 1.6e-38, just above float32's smallest normal number (1.2e-38).
FLUSH_BELOW = -87.0


def decay_exp(log_decay: torch.Tensor) -> torch.Tensor:
    """exp(log_decay) for a real tensor, with every value whose exact result is below 1.6e-38
    (log_decay <= -87, -inf included) set to exactly 0, as flush-to-zero arithmetic would: equal
    to torch.exp to within 1.6e-38, and differentiable the same way (zero gradient there). NaN
    stays NaN."""
    return torch.where(log_decay <= FLUSH_BELOW, 0.0, torch.exp(log_decay.clamp(min=FLUSH_BELOW)))
