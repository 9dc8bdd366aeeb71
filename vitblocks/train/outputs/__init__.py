"""The outputs room: what a run records and writes, and reading it back.

- `run_folder`: `RunFolder`, the one writer of a run's files (atomic, never through a
  link, nothing the run did not write), and their names.
- `state`: `TrainingState`, where a run is (epoch, batch, step, history).
- `checkpointer`: `Checkpointer`, which writes checkpoints of the parts it is handed and
  resumes from them exactly; `resume_checks` what a resume must keep; `health` whether
  weights are fit to be saved.
- `checkpoint`: training checkpoints read safely, and the random streams they hold.
- `model_folder`: timm model folders (weights, EMA weights, config.json).
- `run_restore`: a resumed run's missing or stale outputs, written again.
- `run_lock`: the lock a live run holds on its folder.
- `foreign_checkpoint`: timm train.py checkpoints and bare state dicts, for eval.
- `report`: the curves plot and the end-of-run summary.

Imports: `vitblocks.train.errors`, `process`, `config`, `data`.
"""
