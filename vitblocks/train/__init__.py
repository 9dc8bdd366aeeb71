"""The shared trainer: `python -m vitblocks.train RECIPE.py [--set key=value ...]`."""

from vitblocks.train.config import (
    AugmentConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    apply_overrides,
    derive_recipe,
    load_recipe,
)
from vitblocks.train.engine import Trainer, TrainingDiverged, create_model, smoke_config

__all__ = [
    "AugmentConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "apply_overrides",
    "create_model",
    "derive_recipe",
    "load_recipe",
    "smoke_config",
]
