"""The shared trainer: `python -m vitblocks.train RECIPE.py [--set key=value ...]`.

Five rooms, each with one role, importing only the rooms below it (`errors` under all):

- `process`: torchrun's processes, stop signals and dying loader workers, logs, extras.
- `config`: the schema, its rules, recipes and overrides.
- `data`: datasets, ImageFolder trees, timm's datasets, how batches reach the device.
- `outputs`: the run folder (the one writer of a run's files), the training state, the
  checkpointer and what a resume must keep, model folders, the lock, reports.
- `run`: the `Trainer` loop, builders, callbacks and their `RunView`, tracking, evaluation.

The names below are the public ones; docs/architecture.md maps the rooms.
"""

from vitblocks.train.config.recipe import apply_overrides, derive, derive_recipe, load_recipe, smoke_config
from vitblocks.train.config.schema import (
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from vitblocks.train.data.run_data import Data
from vitblocks.train.errors import ConfigError, RunLockedError, TrainingDiverged, TrainingInterrupted
from vitblocks.train.outputs.state import TrainingState
from vitblocks.train.process.preemption import PREEMPTED_EXIT_CODE
from vitblocks.train.run.builders import build_criterion, build_data, build_model, build_optimizer_and_schedule
from vitblocks.train.run.callbacks import Callback, OnStepEnd, default_callbacks
from vitblocks.train.run.engine import Trainer
from vitblocks.train.run.hooks import RunView

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
    "RunView",
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
