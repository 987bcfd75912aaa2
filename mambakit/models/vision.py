"""Vision Mamba image classifier: patches as tokens, bidirectional Mamba blocks, a class token in
the middle of the sequence (so that both scan directions reach it halfway), a linear head on it."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..layers import BidirectionalMixer, Block, RMSNorm
from .lm import MIXERS

LAYERS = {name.lower(): cls for name, cls in MIXERS.items()}  # "mamba1" -> Mamba1, ...


class VisionMamba(nn.Module):
    """(b, channels, height, width) images -> (b, n_classes) logits.

    Args:
        image_size: (height, width) or one int for square images; both multiples of patch_size.
        patch_size: side of the square patches (a strided conv embeds each as one token).
        in_chans: image channels.
        n_classes: output classes.
        d_model: token width, default 64.
        n_layers: bidirectional blocks (pre-norm residual, RMSNorm), default 4.
        layer: "mamba1" (default), "mamba2" or "mamba3".
        layer_kwargs: extra arguments of the mixer (e.g. d_state, headdim).

    Tokens: (height / patch) * (width / patch) patches plus the class token at index
    n_patches // 2; a learned position embedding over all of them.

    Example:
        >>> model = VisionMamba(8, 2, 1, 10, d_model=16, n_layers=1)
        >>> model(torch.rand(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(self, image_size, patch_size: int, in_chans: int, n_classes: int, d_model: int = 64,
                 n_layers: int = 4, layer: str = "mamba1", layer_kwargs: dict | None = None):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        for name, value in (("patch_size", patch_size), ("in_chans", in_chans), ("n_classes", n_classes),
                            ("d_model", d_model), ("n_layers", n_layers), ("image height", height),
                            ("image width", width)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if height % patch_size or width % patch_size:
            raise ValueError(f"image_size: expected multiples of patch_size {patch_size}, got {(height, width)}")
        if layer not in LAYERS:
            raise ValueError(f"layer: expected one of {sorted(LAYERS)}, got {layer!r}")
        self.image_size = (height, width)
        self.in_chans = in_chans
        n_patches = (height // patch_size) * (width // patch_size)
        self.class_position = n_patches // 2
        self.patch_embed = nn.Conv2d(in_chans, d_model, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, d_model) * 0.02)
        mixer_cls = LAYERS[layer]
        self.blocks = nn.ModuleList(
            Block(d_model, BidirectionalMixer(mixer_cls, d_model, **(layer_kwargs or {})), None, RMSNorm)
            for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, in_chans, height, width) float -> logits (b, n_classes)."""
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor, got {getattr(images, 'dtype', type(images))}")
        if images.dim() != 4 or images.shape[1] != self.in_chans or tuple(images.shape[2:]) != self.image_size:
            raise ValueError(f"images: expected shape (b, {self.in_chans}, {self.image_size[0]}, "
                             f"{self.image_size[1]}), got {tuple(images.shape)}")
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (b, n_patches, d_model)
        cls = self.class_token.expand(patches.shape[0], -1, -1).to(patches.dtype)
        k = self.class_position
        tokens = torch.cat([patches[:, :k], cls, patches[:, k:]], dim=1) + self.pos_embed
        hidden, residual = tokens, None
        for block in self.blocks:
            hidden, residual = block(hidden, residual)
        hidden = self.norm_f(hidden + residual)
        return self.head(hidden[:, k])
