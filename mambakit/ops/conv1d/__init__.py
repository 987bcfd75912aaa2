"""Causal depthwise 1D convolution (the short conv of the Mamba mixers) and its decode step."""

from .api import causal_conv1d, causal_conv1d_update
from .reference import causal_conv1d_reference, causal_conv1d_update_reference

__all__ = ["causal_conv1d", "causal_conv1d_reference", "causal_conv1d_update", "causal_conv1d_update_reference"]
