"""Causal depthwise 1D convolution (the short conv of the Mamba mixers) and its decode step."""

from .reference import causal_conv1d, causal_conv1d_update

__all__ = ["causal_conv1d", "causal_conv1d_update"]
