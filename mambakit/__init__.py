"""mambakit: the Mamba family of sequence models as one PyTorch library."""

__version__ = "0.1.0"
