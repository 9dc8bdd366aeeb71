"""The shared trainer: `python -m vitblocks.train RECIPE.py [--set key=value ...]`.

Parts: `config` (the schema; `config_fields`, `config_checks` its rules, `recipe` loading and deriving), `builders` (model, data, optimizer and schedule,
criterion from a config), `state` (where a run is), `callbacks` (what happens around
the loop), `engine` (the `Trainer`), `resumable` (its checkpoints and exact resumption;
`resume_checks` what a resume must keep), `run_folder` (every file a run writes),
`preemption` (stop signals, dying loader workers).
"""

from vitblocks.train.builders import Data, build_criterion, build_data, build_model, build_optimizer_and_schedule
from vitblocks.train.callbacks import Callback, OnStepEnd, TrainingDiverged, default_callbacks
from vitblocks.train.config import (
    AugmentConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from vitblocks.train.engine import Trainer
from vitblocks.train.preemption import PREEMPTED_EXIT_CODE, TrainingInterrupted
from vitblocks.train.recipe import apply_overrides, derive, derive_recipe, load_recipe, smoke_config
from vitblocks.train.run_lock import RunLockedError
from vitblocks.train.state import TrainingState

__all__ = [
    "PREEMPTED_EXIT_CODE",
    "AugmentConfig",
    "Callback",
    "CheckpointConfig",
    "ConfigError",
    "Data",
    "DataConfig",
    "DistillConfig",
    "LoggingConfig",
    "ModelConfig",
    "OnStepEnd",
    "OptimConfig",
    "RunLockedError",
    "ScheduleConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "TrainingState",
    "apply_overrides",
    "build_criterion",
    "build_data",
    "build_model",
    "build_optimizer_and_schedule",
    "default_callbacks",
    "derive",
    "derive_recipe",
    "load_recipe",
    "smoke_config",
]
