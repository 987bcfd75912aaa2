"""mambakit: the Mamba family of sequence models as one PyTorch library."""

__version__ = "0.1.0"

from .cache import InferenceCache
from .checkpoints import load_pretrained, save_pretrained
from .generation import generate, stream_generate
from .models import MambaConfig, MambaLM
from .speculative import SpeculativeStats, speculative_generate

__all__ = ["InferenceCache", "MambaConfig", "MambaLM", "SpeculativeStats", "generate", "load_pretrained", "save_pretrained",
           "speculative_generate", "stream_generate"]
