"""Mamba-1 selective scan (S6): reference (the spec and the CPU path) and Triton kernels."""

from .api import selective_scan
from .reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]
