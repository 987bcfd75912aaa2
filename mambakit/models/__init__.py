"""Models built from the layers."""

from .config import MambaConfig
from .lm import MambaLM

__all__ = ["MambaConfig", "MambaLM"]
