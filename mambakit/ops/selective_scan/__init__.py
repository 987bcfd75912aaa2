"""Mamba-1 selective scan (S6), MATH.md section 2."""

from .reference import selective_scan

__all__ = ["selective_scan"]
