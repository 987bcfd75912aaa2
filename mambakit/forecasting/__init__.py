"""Long-horizon time-series forecasting with Mamba variants (S-Mamba, Bi-Mamba+, ms-Mamba, SOR-Mamba) and baselines
(DLinear, LSTM): data loading by the ETT protocol, models built from shared blocks, training
with early stopping (``mambakit forecast``)."""

from .blocks import BiMambaLayer, MambaPlus, MultiScaleMamba, RevIN, sra_decider
from .data import Series, Splits, Windows, ett_splits, mse_mae, read_csv
from .models import MODELS, PAPER_CONFIGS, BiMambaPlus, DLinear, LSTMForecaster, SMamba, SORMamba, build_model
from .train import PAPER_TRAINING, ForecastConfig, run_forecast

__all__ = ["BiMambaLayer", "BiMambaPlus", "DLinear", "ForecastConfig", "LSTMForecaster", "MODELS", "MambaPlus",
           "MultiScaleMamba", "PAPER_CONFIGS", "PAPER_TRAINING", "RevIN", "SMamba", "SORMamba", "Series", "Splits",
           "Windows", "build_model", "ett_splits", "mse_mae", "read_csv", "run_forecast", "sra_decider"]
