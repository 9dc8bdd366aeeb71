"""TensorBoard and Weights & Biases logging, and their continuation after a resume."""

import pytest

from train_helpers import tiny_config
from vitblocks.train import Trainer
from vitblocks.train.config.schema import LoggingConfig

pytestmark = pytest.mark.slow  # trains or starts processes: left out of the quick subset

pytest.importorskip("tensorboard", reason="the tracking extra: pip install -e '.[tracking]'")
pytest.importorskip("wandb", reason="the tracking extra: pip install -e '.[tracking]'")


def scalars(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_and_wandb_record_the_run_and_continue_after_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tmp_path / "run", epochs=1, logging=LoggingConfig(
        tensorboard=True, wandb={"project": "vitblocks-tests", "name": "tiny"}))
    first = Trainer(config)
    first.fit(progress=False)
    folder = tmp_path / "run" / "tensorboard"
    top1 = scalars(folder, "epoch/val_top1")
    assert [step for step, _ in top1] == [6] and top1[0][1] == pytest.approx(first.history[0]["val_top1"])  # float32
    assert [step for step, _ in scalars(folder, "train/loss")] == list(range(1, 7))
    run_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    runs = list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "an offline wandb run with its records"

    config.epochs = 2
    resumed = Trainer(config)
    resumed.resume(tmp_path / "run" / "last.pth")
    resumed.fit(progress=False)
    assert [step for step, _ in scalars(folder, "epoch/val_top1")] == [6, 12]
    assert [step for step, _ in scalars(folder, "train/loss")] == list(range(1, 13))
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() == run_id  # the same wandb run continues
    assert len(list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
