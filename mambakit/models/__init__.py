"""Models built from the layers."""

from .config import MambaConfig
from .lm import MambaLM
from .vision import VisionMamba

__all__ = ["MambaConfig", "MambaLM", "VisionMamba"]
