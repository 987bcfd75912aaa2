"""Normalisations of the Mamba blocks: RMSNorm, LayerNorm, gated RMSNorm, residual add + norm."""

from .api import add_norm, gated_rms_norm, rms_norm
from .reference import add_norm_reference, gated_rms_norm_reference, layer_norm, rms_norm_reference

__all__ = ["add_norm", "add_norm_reference", "gated_rms_norm", "gated_rms_norm_reference", "layer_norm", "rms_norm", "rms_norm_reference"]
