"""Generic first-order linear recurrences (MATH.md section 0)."""

from .linear_scan import linear_scan

__all__ = ["linear_scan"]
