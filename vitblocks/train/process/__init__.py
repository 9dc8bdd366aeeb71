"""The process room: what a training process needs of its surroundings.

- `distributed`: torchrun's processes, and collectives that keep them in step.
- `preemption`: stop signals and dying loader workers.
- `logs`: one console log per job.
- `extras`: the optional packages of the trainer, with one clear error when missing.

Imports: `vitblocks.train.errors` only.
"""
