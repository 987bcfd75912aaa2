"""Sequence-mixing ops. Each op has a plain-PyTorch reference (the spec and the CPU path)."""

from .discretization import euler, exp_trapezoidal, expm1_over_x, zoh, zoh_matrix
from .mamba3 import Mamba3State, mamba3
from .scan import linear_scan
from .selective_scan import selective_scan
from .ssd import ssd

__all__ = [
    "Mamba3State",
    "euler",
    "exp_trapezoidal",
    "expm1_over_x",
    "linear_scan",
    "mamba3",
    "selective_scan",
    "ssd",
    "zoh",
    "zoh_matrix",
]
