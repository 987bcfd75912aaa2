"""Mamba-1 selective scan (S6): reference (the spec and the CPU path) and Triton kernels, and the
Mamba-1 mixer's one-token decode step."""

from .api import selective_scan
from .mixer_step import mamba1_mixer_step, mamba1_mixer_step_reference
from .reference import selective_scan_reference

__all__ = ["mamba1_mixer_step", "mamba1_mixer_step_reference", "selective_scan", "selective_scan_reference"]
