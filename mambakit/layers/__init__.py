"""Modules built on the ops: norms, the Mamba mixers, attention, MLP and the residual block."""

from .attention import MHA
from .bidirectional import BidirectionalMixer
from .binary import BinaryLinear, binarize_projections, pack_binary, unpack_binary
from .block import Block
from .mamba1 import Mamba1
from .mamba2 import Mamba2
from .mamba3 import Mamba3
from .mlp import GatedMLP
from .moe import MoE
from .norm import RMSNorm, RMSNormGated

__all__ = [
    "MHA", "BidirectionalMixer", "BinaryLinear", "Block", "GatedMLP", "Mamba1", "Mamba2", "Mamba3", "MoE", "RMSNorm",
    "RMSNormGated", "binarize_projections", "pack_binary", "unpack_binary",
]
