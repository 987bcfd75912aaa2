"""Models built from the layers."""

from .config import MambaConfig, jamba_config, moe_mamba_config
from .lm import MambaLM
from .vision import VisionMamba

__all__ = ["MambaConfig", "MambaLM", "VisionMamba", "jamba_config", "moe_mamba_config"]
