"""Mamba-2 state space duality (SSD) scan, MATH.md section 3."""

from .api import ssd
from .step import ssd_step

__all__ = ["ssd", "ssd_step"]
