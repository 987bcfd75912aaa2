"""Normalisations of the Mamba blocks: RMSNorm, LayerNorm, gated RMSNorm, residual add + norm."""

from .reference import add_norm, gated_rms_norm, layer_norm, rms_norm

__all__ = ["add_norm", "gated_rms_norm", "layer_norm", "rms_norm"]
