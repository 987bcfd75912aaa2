"""Normalisations of the Mamba blocks: RMSNorm, LayerNorm, gated RMSNorm (also fused with the
projection after it, for decode), residual add + norm."""

from .api import add_norm, gated_rms_norm, rms_norm
from .linear import gated_rms_norm_linear, gated_rms_norm_linear_reference
from .reference import add_norm_reference, gated_rms_norm_reference, layer_norm, rms_norm_reference

__all__ = ["add_norm", "add_norm_reference", "gated_rms_norm", "gated_rms_norm_linear",
           "gated_rms_norm_linear_reference", "gated_rms_norm_reference", "layer_norm", "rms_norm", "rms_norm_reference"]
