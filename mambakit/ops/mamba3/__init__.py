"""Mamba-3: exponential-trapezoidal SSM with rotary phase, SISO and MIMO (MATH.md section 4)."""

from .api import mamba3
from .reference import Mamba3State, mamba3_reference
from .step import mamba3_step, mamba3_step_reference

__all__ = ["Mamba3State", "mamba3", "mamba3_reference", "mamba3_step", "mamba3_step_reference"]
