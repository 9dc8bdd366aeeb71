"""A resume never mixes two runs (other data, classes, split, seed, image size), and a run folder
writes only its own files: atomically, never through a link, everything restored on resume."""

import errno
import logging
import shutil
from pathlib import Path

import pytest
import torch

from train_helpers import tiny_config, write_digit_folder, write_tiny_recipe
from vitblocks.io import CheckpointError, save_model_file
from vitblocks.train import ConfigError, DataConfig, Trainer, derive
from vitblocks.train.__main__ import main as train
from vitblocks.train.errors import RunExistsError, RunLinkError
from vitblocks.train.outputs.checkpoint import load_training_checkpoint
from vitblocks.train.outputs.run_folder import CONFIG_KEY, STEP_KEY, RunFolder
from vitblocks.train.outputs.run_restore import curves_current, model_folder_current

pytestmark = pytest.mark.slow  # trains: left out of the quick subset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"), train_per_class=2, val_per_class=1)


def folder_config(output_dir, root, **changes):
    data = DataConfig(dataset="imagefolder", root=str(root), img_size=32, num_classes=3, batch_size=3, workers=0)
    return tiny_config(output_dir, epochs=1, data=data, **changes)


def refused(config, checkpoint, *fragments, allow=()):
    with pytest.raises(CheckpointError) as stopped:
        Trainer(config).resume(checkpoint, allow_changes=allow)
    for fragment in fragments:
        assert fragment in str(stopped.value), (fragment, str(stopped.value))


def test_a_resume_refuses_other_data_classes_or_seed_naming_the_field_unless_allowed(tmp_path, digits):
    config = folder_config(tmp_path / "run", digits)
    Trainer(config).save()
    checkpoint = tmp_path / "run" / "last.pth"
    other = write_digit_folder(tmp_path / "other", classes=("ant", "bee", "cat"), train_per_class=2, val_per_class=1)
    elsewhere = derive(config, data={"root": str(other)})
    refused(elsewhere, checkpoint, "data.root: the checkpoint's run trained on 3 classes (c1, c2, c10), "
            f"{other} has 3 (ant, bee, cat)", "Resuming would mix two runs in one history",
            "--resume-changed data.root")
    Trainer(elsewhere).resume(checkpoint, allow_changes=["data.root"])  # on purpose
    moved = shutil.copytree(digits, tmp_path / "moved")
    Trainer(derive(config, data={"root": str(moved)})).resume(checkpoint)  # the same data, moved: no word needed
    (Path(moved) / "val" / "c2" / "0.png").unlink()
    refused(derive(config, data={"root": str(moved)}), checkpoint,
            f"data.root: the checkpoint's run had 3 val images, {moved} has 2")
    refused(derive(config, seed=1), checkpoint, "seed: 0 in the checkpoint, 1 now (it fixes each epoch's sample order")
    same_widths = derive(config, model={"kwargs": {"embed_dims": [16, 32, 64]}})  # a list, not the tuple: no change
    Trainer(same_widths).resume(checkpoint)
    with pytest.raises(ConfigError, match=r"--resume-changed data.rot: no config field of that name; did you mean "
                                          r"data.root"):
        Trainer(elsewhere).resume(checkpoint, allow_changes=["data.rot"])


def test_a_digits_run_refuses_a_new_split_or_dataset(tmp_path):
    config = tiny_config(tmp_path / "run", data=DataConfig(dataset="digits", img_size=32, num_classes=10,
                                                           batch_size=8, workers=0))
    Trainer(config).save()
    checkpoint = tmp_path / "run" / "last.pth"
    refused(derive(config, seed=3), checkpoint, "seed: 0 in the checkpoint, 3 now",
            "and the digits' and synthetic data's validation split")
    refused(derive(config, data={"val_fraction": 0.3}), checkpoint,
            "data.val_fraction: 0.2 in the checkpoint, 0.3 now (it decides which images are training")
    folder = write_digit_folder(tmp_path / "folder", classes=[str(i) for i in range(10)], train_per_class=1,
                                val_per_class=1)
    refused(derive(config, data={"dataset": "imagefolder", "root": str(folder)}), checkpoint,
            "data.dataset: 'digits' in the checkpoint, 'imagefolder' now")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch tiny run: its optimizer holds state for every parameter."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(folder, epochs=1)).fit(progress=False)
    return folder


def test_a_new_image_size_is_refused_by_name_or_when_allowed_restarts_the_resized_parameters_moments(
        tmp_path, trained, caplog):
    run = shutil.copytree(trained, tmp_path / "run")
    bigger = tiny_config(run, epochs=2, data=DataConfig(dataset="synthetic", img_size=48, num_classes=4,
                                                        batch_size=8, workers=0, synthetic_samples=48))
    refused(bigger, run / "last.pth", "data.img_size: 32 in the checkpoint, 48 now (size-dependent weights",
            "--resume-changed data.img_size")
    trainer = Trainer(bigger)
    logging.getLogger("vitblocks.train").addHandler(caplog.handler)
    try:
        trainer.resume(run / "last.pth", allow_changes=["data.img_size"])
    finally:
        logging.getLogger("vitblocks.train").removeHandler(caplog.handler)
    assert "the optimizer state of pos_embed.weight starts afresh" in caplog.text
    trainer.fit(progress=False)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in trainer.state.history)


def test_an_ema_turned_on_at_a_resume_starts_from_the_resumed_weights(tmp_path, trained):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=2, ema_decay=0.9))
    trainer.resume(trained / "last.pth")
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(trainer.ema.module.state_dict()[name], value), name


def test_a_model_folder_is_current_when_its_weights_are_of_the_step_and_say_whether_a_config_follows(tmp_path):
    model, folder = torch.nn.Linear(2, 2), RunFolder(tmp_path)
    config = tiny_config(tmp_path)
    save_model_file(model, tmp_path / "model.safetensors", metadata={STEP_KEY: "4", CONFIG_KEY: "False"})
    assert model_folder_current(folder, config, ema=False, step=4)  # timm could not describe it: no config.json
    assert not model_folder_current(folder, config, ema=False, step=5)
    save_model_file(model, tmp_path / "model.safetensors", metadata={STEP_KEY: "4", CONFIG_KEY: "True"})
    assert not model_folder_current(folder, config, ema=False, step=4)  # its config.json is missing


def test_an_optimizer_state_of_another_shape_is_never_handed_to_the_optimizer(tmp_path, trained):
    state = load_training_checkpoint(trained / "last.pth")
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = torch.zeros(*moments["exp_avg"].shape[:-1], moments["exp_avg"].shape[-1] + 1)
    torch.save(state, tmp_path / "bad.pth")
    refused(tiny_config(tmp_path / "run", epochs=2), tmp_path / "bad.pth",
            "its optimizer state does not fit this model's parameters:", "(exp_avg (",
            "refused rather than handed to the optimizer")


# ---- the run folder ------------------------------------------------------------------------------------

def test_a_fresh_run_never_replaces_files_it_did_not_write_and_names_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("my own config")
    (run / "curves.png").write_bytes(b"my own plot")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match=r"already holds files a run writes \(curves.png, config.json\); starting "
                                             r"afresh would replace them. Replace them with --overwrite"):
        Trainer(tiny_config(run, epochs=1)).fit(progress=False)
    assert (run / "config.json").read_text() == "my own config" and not (run / "last.pth").exists()
    Trainer(tiny_config(run, epochs=1), overwrite=True).fit(progress=False)
    assert (run / "notes.txt").read_text() == "mine" and (run / "last.pth").is_file()


def test_a_run_never_writes_or_removes_through_a_link(tmp_path):
    elsewhere, run = tmp_path / "elsewhere", tmp_path / "run"
    elsewhere.mkdir()
    run.mkdir()
    (run / "best").symlink_to(elsewhere)
    with pytest.raises(RunLinkError, match=rf"{run}/best is a symbolic link \(to {elsewhere}\); a run writes only its "
                                           r"own files"):
        Trainer(tiny_config(run, epochs=1), overwrite=True).fit(progress=False)
    (run / "best").unlink()
    (elsewhere / "keep.pth").write_bytes(b"someone else's")
    (run / "last.pth").symlink_to(elsewhere / "keep.pth")
    with pytest.raises(RunLinkError, match="last.pth is a symbolic link"):
        Trainer(tiny_config(run, epochs=1), overwrite=True).fit(progress=False)
    assert [p.name for p in elsewhere.iterdir()] == ["keep.pth"] and (elsewhere / "keep.pth").read_bytes()


def test_a_full_disk_names_the_file_and_the_space_and_a_resume_writes_every_missing_output_again(
        tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path, run)
    write = RunFolder.write

    def full_at(name):
        def failing(self, target, writer, advice=None):
            if target != name:
                return write(self, target, writer, advice)

            def partial(temporary):
                Path(temporary).write_bytes(b"part of it")
                raise OSError(errno.ENOSPC, "No space left on device")

            return write(self, target, partial, advice)

        monkeypatch.setattr(RunFolder, "write", failing)

    full_at("metrics.csv")
    assert train([recipe, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert (f"could not write {run}/metrics.csv ([Errno 28] No space left on device); "
            "no metrics.csv was written, ") in err
    assert " free on its filesystem. Free some space, then run the same command with --resume auto" in err
    assert not (run / "metrics.csv").exists() and not list(run.glob(".*.tmp"))
    monkeypatch.undo()
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 0
    assert f"wrote metrics.csv, model.safetensors, config.json, curves.png in {run} again" in capsys.readouterr().out
    folder, step = RunFolder(run), load_training_checkpoint(run / "last.pth")["step"]
    assert folder.read_metrics_epochs() == [1] and curves_current(folder, step)

    (run / "metrics.csv").write_text("")  # damaged every way a killed or failed write could leave them
    (run / "curves.png").write_bytes((run / "curves.png").read_bytes()[:100])
    (run / "best" / "model.safetensors").unlink()
    stale = Trainer(tiny_config(tmp_path / "other", epochs=1)).model  # another point of the run, as an
    save_model_file(stale, run / "model.safetensors", metadata={STEP_KEY: "1"})  # extended run's old final folder
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 0
    assert f"wrote metrics.csv, best/, model.safetensors, config.json, curves.png in {run} again" in \
        capsys.readouterr().out
    from safetensors.torch import load_file

    for name, checkpoint in (("best/model.safetensors", "best.pth"), ("model.safetensors", "last.pth")):
        expected = load_training_checkpoint(run / checkpoint)["model"]["head.weight"]
        assert torch.equal(load_file(run / name)["head.weight"], expected), name
    assert model_folder_current(folder, tiny_config(run), ema=False, step=step) and curves_current(folder, step)

    full_at("curves.png")
    (run / "curves.png").unlink()
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert f"could not write {run}/curves.png ([Errno 28] No space left on device)" in err and "free on its" in err
