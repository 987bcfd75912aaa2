"""Sequence-mixing ops. Each op has a plain-PyTorch reference (the spec and the CPU path)."""

from .scan import linear_scan

__all__ = ["linear_scan"]
