"""No finished run overwritten, no label silently wrong, schedules and best/last consistent on resume."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import assert_clear_error, run_cli, tiny_config, write_tiny_recipe
from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.io import CheckpointError
from vitblocks.train import OnStepEnd, Trainer
from vitblocks.train.config.schema import DataConfig
from vitblocks.train.data.datasets import build_dataset, dataset_classes
from vitblocks.train.errors import DataError, RunExistsError
from vitblocks.train.outputs.checkpoint import load_training_checkpoint

pytestmark = pytest.mark.slow  # trains or starts processes: left out of the quick subset

DRIVER = Path(__file__).parent / "train_driver.py"


def make_folder(root, train_classes, val_classes, per_class=4, size=36):
    rng = np.random.default_rng(0)
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            shade = 40 + 60 * sorted(set(train_classes) | set(val_classes)).index(name)
            for i in range(per_class):
                Image.fromarray((rng.random((size, size, 3)) * 30 + shade).astype(np.uint8)).save(folder / f"{i}.png")


def folder_config(tmp_path, root, num_classes):
    data = DataConfig(dataset="imagefolder", root=str(root), img_size=32, num_classes=num_classes, batch_size=4,
                      workers=0)
    return tiny_config(tmp_path / "run", epochs=1, data=data)


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    from vitblocks.train.__main__ import main as train

    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert train([recipe, "--no-progress"]) == 0
    before = (tmp_path / "run" / "best.pth").read_bytes()
    refused = run_cli("vitblocks.train", recipe, "--no-progress", "--set", "epochs=2")  # the real command line
    assert_clear_error(refused, "already holds a run", "--resume auto", "--overwrite")
    assert (tmp_path / "run" / "best.pth").read_bytes() == before  # untouched
    assert train([recipe, "--no-progress", "--set", "epochs=2", "--resume", "auto"]) == 0
    assert load_training_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 2
    capsys.readouterr()
    assert train([recipe, "--no-progress", "--set", "epochs=2", "--resume", "auto"]) == 0
    assert "already complete: 2 of 2 epochs" in capsys.readouterr().out
    assert train([recipe, "--no-progress", "--overwrite"]) == 0
    assert load_training_checkpoint(tmp_path / "run" / "last.pth")["epoch"] == 1
    with pytest.raises(RunExistsError):
        Trainer(tiny_config(tmp_path / "run")).fit(progress=False)


def test_every_split_numbers_its_classes_by_the_train_split(tmp_path):
    make_folder(tmp_path / "data", ["ant", "bee", "cat"], ["bee", "cat"])  # val lacks the first class
    config = folder_config(tmp_path, tmp_path / "data", 3)
    assert dataset_classes(config) == ["ant", "bee", "cat"]
    val = build_dataset(config, train=False)
    assert sorted({int(label) for _, label in val}) == [1, 2]  # bee and cat keep train's labels
    trainer = Trainer(config)
    assert [int(label) for _, label in trainer.data.val_set] == [1] * 4 + [2] * 4
    trainer.fit(progress=False)
    assert load_training_checkpoint(tmp_path / "run" / "last.pth")["classes"] == ["ant", "bee", "cat"]


def test_a_val_class_that_train_lacks_and_a_wrong_class_count_are_refused(tmp_path):
    make_folder(tmp_path / "data", ["ant", "bee"], ["ant", "bee", "wasp"])
    with pytest.raises(DataError, match=r"val has classes that the training classes lack: wasp"):
        build_dataset(folder_config(tmp_path, tmp_path / "data", 2), train=False)
    with pytest.raises(DataError,
                       match=r"data.num_classes=7 but .*train has 2 classes \(ant, bee\); set data.num_classes=2"):
        Trainer(folder_config(tmp_path, tmp_path / "data", 7))


def test_eval_refuses_data_of_other_classes_than_the_checkpoints(tmp_path):
    make_folder(tmp_path / "data", ["ant", "bee", "cat"], ["ant", "bee", "cat"])
    Trainer(folder_config(tmp_path, tmp_path / "data", 3)).fit(progress=False)
    make_folder(tmp_path / "other", ["dog", "eel"], ["dog", "eel"])
    result = run_cli("vitblocks.eval", tmp_path / "run" / "last.pth", "--data", tmp_path / "other")
    assert_clear_error(result, "has classes the checkpoint", "dog, eel", "ant, bee, cat")
    # a checkpoint from before class names were stored: compared by count
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    del state["classes"]
    torch.save(state, tmp_path / "old.pth")
    with pytest.raises(CheckpointError, match="a model with 3 classes but the training split .* has 2"):
        evaluate_checkpoint(str(tmp_path / "old.pth"), str(tmp_path / "other"))
    assert 0 <= evaluate_checkpoint(str(tmp_path / "run" / "last.pth"), str(tmp_path / "data"))["val_top1"] <= 100


def test_resuming_with_more_epochs_follows_the_schedule_of_the_longer_run(tmp_path):
    def learning_rates(trainer):
        seen = []
        trainer.callbacks.append(OnStepEnd(lambda t: seen.append(t.optimizer.param_groups[0]["lr"])))
        trainer.fit(progress=False)
        return seen

    short = Trainer(tiny_config(tmp_path / "a", epochs=2, augment=tiny_config(tmp_path).augment))
    first = learning_rates(short)
    longer = Trainer(tiny_config(tmp_path / "a", epochs=4))
    longer.resume(tmp_path / "a" / "last.pth")
    extra = learning_rates(longer)
    fresh = learning_rates(Trainer(tiny_config(tmp_path / "b", epochs=4)))
    assert len(first) + len(extra) == len(fresh)
    assert extra == pytest.approx(fresh[len(first):]) and extra[0] > 10 * fresh[-1]  # not stuck at min_lr


def test_best_is_written_before_last_so_a_crash_between_them_leaves_a_consistent_pair(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the driver runs, so the reference is bit-identical
    try:
        config = tiny_config(tmp_path / "reference")
        config.checkpoint.every_steps = 2
        Trainer(config).fit(progress=False)
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "crashed"
    killed = subprocess.run([sys.executable, str(DRIVER), str(run), "--kill-before-last-of-epoch", "1"],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    best, last = (load_training_checkpoint(run / name) for name in ("best.pth", "last.pth"))
    assert best["epoch"] == 1 and last["epoch"] == 0 and not list(run.glob(".*.tmp"))  # last.pth: mid-epoch one
    resumed = subprocess.run([sys.executable, str(DRIVER), str(run), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    final_best, expected = (load_training_checkpoint(p / "best.pth") for p in (run, tmp_path / "reference"))
    assert final_best["epoch"] == expected["epoch"] and final_best["best_top1"] == expected["best_top1"]
    for key in expected["model"]:
        assert torch.equal(final_best["model"][key], expected["model"][key]), key
    assert os.path.getsize(run / "metrics.csv") > 0


def test_temporary_files_of_a_killed_write_are_removed_when_a_run_starts(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".last.pth.k2j3h.tmp", run / ".best.pth.x9.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    Trainer(tiny_config(run, epochs=1)).fit(progress=False)
    assert not any(path.exists() for path in stale) and (run / "last.pth").is_file()
