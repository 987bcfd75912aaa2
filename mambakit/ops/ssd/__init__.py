"""Mamba-2 state space duality (SSD) scan, MATH.md section 3."""

from .reference import ssd

__all__ = ["ssd"]
