"""The configuration room: what a run is, written down and checked before anything is built.

- `schema`: `TrainConfig` and its sections, whose fields declare their own rules.
- `fields`: those rules (`choice`, `bounded`, `at_least_one`) and how they are checked.
- `checks`: what spans fields (`validate`) and what names timm's registries must know
  (`check_names`: model, model options, optimizer, schedule).
- `recipe`: recipe files, `derive` (the one way a config changes) and `--set` overrides.
- `names`: names a config chooses among that other rooms act on (compile modes, timm's
  dataset prefixes).

Imports: `vitblocks.train.errors`, `vitblocks.train.process`, and the layers and models.
"""

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
from vitblocks.train.errors import ConfigError

__all__ = ["AugmentConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistillConfig", "LoggingConfig",
           "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig"]
