"""Training: ``train(TrainConfig(...))`` or ``mambakit train``; synthetic tasks with ``mambakit task``."""

from .config import PRESETS, TrainConfig, model_config
from .trainer import train

__all__ = ["PRESETS", "TrainConfig", "model_config", "train"]
