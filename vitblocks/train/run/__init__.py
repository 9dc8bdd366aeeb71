"""The run room: the training loop and what turns around it.

- `engine`: `Trainer`, the loop.
- `builders`: model, data, optimizer and schedule, criterion, each from a config.
- `hooks`: `Callback`'s hooks and `RunView`, what a callback sees of the run;
  `callbacks`: the default ones; `tracking`: TensorBoard and wandb; `header`: the run header.
- `evaluation`: the validation pass (shared with `vitblocks.eval`).
- `precision`, `compile_modes`, `training_model`: how the step runs (autocast, compile
  modes, DDP wrapping); `update_start`: where an accumulated update began.
- `distill`: the distillation loss and its teacher.

Imports: every other room of `vitblocks.train`.
"""
