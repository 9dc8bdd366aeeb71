"""Training on a cluster: signals, two jobs on one folder, divergence, full disks and changed batch sizes."""

import csv
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import assert_clear_error, run_cli, tiny_config, write_tiny_recipe
from vitblocks.train import OnStepEnd, Trainer, TrainingDiverged
from vitblocks.train.__main__ import main as train
from vitblocks.train.data.datasets import ResumableSampler
from vitblocks.train.errors import RunLockedError
from vitblocks.train.outputs.checkpoint import load_training_checkpoint
from vitblocks.train.outputs.run_lock import LOCK_NAME, STALE_AFTER_S, RunLock, holder_alive
from vitblocks.train.process.preemption import PREEMPTED_EXIT_CODE, StopSignals

pytestmark = pytest.mark.slow  # trains or starts processes: left out of the quick subset

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished one-epoch tiny run (with EMA), copied by the tests that resume or damage it."""
    folder = tmp_path_factory.mktemp("good") / "run"
    Trainer(tiny_config(folder, epochs=1, ema_decay=0.9)).fit(progress=False)
    return folder


def copy_run(source, target):
    shutil.copytree(source, target)
    return target


# ---- preemption -------------------------------------------------------------------

def test_sigint_to_the_command_line_saves_says_how_to_resume_and_exits_75(tmp_path):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    process = subprocess.Popen([sys.executable, "-m", "vitblocks.train", recipe, "--no-progress", "--set", "epochs=200",
                                "--set", "checkpoint.every_steps=0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in process.stdout:
        if line.startswith("epoch=1 "):  # training: the handlers are in place
            break
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "stopped by SIGINT at step" in err and f"saved {tmp_path / 'run' / 'last.pth'}" in err
    assert f"Continue with: python -m vitblocks.train {recipe} --no-progress --set epochs=200" in err
    assert err.strip().endswith("--resume auto")
    state = load_training_checkpoint(tmp_path / "run" / "last.pth")
    assert state["step"] >= 4 and (state["step"] - state["epoch"] * 4) == state["batch"]  # 4 steps per epoch
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs in the background
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's --signal
        assert stop.received == "SIGUSR1"
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored

    def interrupted(self, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    assert train([write_tiny_recipe(tmp_path, tmp_path / "run"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted; stopped at once") and len(err.strip().splitlines()) == 1


# ---- one run per folder -----------------------------------------------------------

HOLD = "import sys, time; from vitblocks.train.outputs.run_lock import RunLock; RunLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(120)"


def test_a_live_run_holds_its_folder_and_a_dead_one_leaves_no_live_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = write_tiny_recipe(tmp_path, run)
        assert train([recipe, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another training run (pid {holder.pid} on {socket.gethostname()}, started" in err
        assert "choose another --output-dir" in err and not (run / "last.pth").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_NAME).exists()  # left behind by the killed holder, but no longer locked
    assert train([recipe, "--no-progress"]) == 0
    assert f"took over the lock of a run that is no longer running (pid {holder.pid}" in capsys.readouterr().out
    assert not (run / LOCK_NAME).exists()


def test_without_flock_the_lock_falls_back_to_pid_host_and_freshness(tmp_path, monkeypatch):
    import vitblocks.train.outputs.run_lock as run_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_flock)
    with RunLock(tmp_path) as lock:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        path = lock.path
        here = socket.gethostname()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        assert not holder_alive({"pid": int(dead.stdout), "host": here}, path)
        assert holder_alive({"pid": os.getpid(), "host": here}, path)
        elsewhere = {"pid": 1, "host": here + "-other"}
        assert holder_alive(elsewhere, path)  # just touched
        assert not holder_alive(elsewhere, path, now=time.time() + STALE_AFTER_S + 1)
        assert not holder_alive({}, path)


# ---- divergence -------------------------------------------------------------------

def test_divergence_never_overwrites_the_good_checkpoint(tmp_path, good_run):
    run = copy_run(good_run, tmp_path / "run")
    best_before = (run / "best.pth").read_bytes()
    config = tiny_config(run, epochs=2, ema_decay=0.9)
    config.optim.lr, config.checkpoint.every_steps = 1e6, 1
    trainer = Trainer(config)
    trainer.resume(run / "last.pth")
    with pytest.raises(TrainingDiverged, match=r"not finite|non-finite") as stopped:
        trainer.fit(progress=False)
    named = Path(str(stopped.value).split("Last good checkpoint: ")[1].split(". Try")[0])
    assert named == run / "last.pth"
    state = load_training_checkpoint(named)
    assert (state["epoch"], state["step"]) == (1, 6)  # the good epoch's state
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    fresh = Trainer(tiny_config(tmp_path / "check", epochs=1, ema_decay=0.9))
    fresh.model.load_state_dict(state["model"])
    assert torch.isfinite(torch.tensor(fresh.evaluate()["val_loss"]))
    assert (run / "best.pth").read_bytes() == best_before
    with open(run / "metrics.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == ["1"]  # no epoch of NaNs recorded


def test_a_non_finite_validation_loss_stops_before_the_epoch_is_recorded(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=1))
    trainer.evaluate = lambda model=None: {"val_loss": float("nan"), "val_top1": 0.0, "val_top5": 0.0}
    with pytest.raises(TrainingDiverged, match=r"validation loss is nan after epoch 1 .*none written yet"):
        trainer.fit(progress=False)
    assert not (tmp_path / "best.pth").exists() and not (tmp_path / "last.pth").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    config.checkpoint.every_steps = 2
    trainer = Trainer(config)

    def poison(trainer):
        if trainer.state.step == 4:  # after the update, before the step-4 checkpoint; its loss was finite
            with torch.no_grad():
                trainer.model.head.bias.fill_(float("inf"))

    trainer.callbacks.insert(0, OnStepEnd(poison))
    with pytest.raises(TrainingDiverged, match=r"weights are not finite \(head.bias\) after step 4"):
        trainer.fit(progress=False)
    assert load_training_checkpoint(tmp_path / "last.pth")["step"] == 2


# ---- full disks -------------------------------------------------------------------

def test_a_full_disk_gives_advice_that_works(tmp_path, monkeypatch, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    save = torch.save

    def full_for_last(obj, path):
        if Path(path).name.startswith(".last.pth."):  # the temporary file renamed over last.pth
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 2048")
        save(obj, path)

    monkeypatch.setattr(torch, "save", full_for_last)
    assert train([recipe, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "no last.pth was written" in err and "--resume auto" in err
    assert " free on its filesystem" in err
    monkeypatch.setattr(torch, "save", save)
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 0  # continues from best.pth
    assert "already complete" in capsys.readouterr().out  # one epoch, and best.pth holds it


def test_a_failed_or_partial_final_weights_file_is_written_again_on_resume(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    assert train([recipe, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "model.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model.safetensors").exists() and not list((tmp_path / "run").glob(".*.tmp"))
    monkeypatch.undo()
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 0
    weights = tmp_path / "run" / "model.safetensors"
    expected = load_training_checkpoint(tmp_path / "run" / "last.pth")["model"]
    assert torch.equal(load_file(weights)["head.weight"], expected["head.weight"])
    weights.write_bytes(weights.read_bytes()[:100])  # a partial file, as an older version could leave
    capsys.readouterr()
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 0
    assert "wrote model.safetensors" in capsys.readouterr().out
    assert torch.equal(load_file(weights)["head.weight"], expected["head.weight"])


def test_overwrite_removes_every_file_of_the_replaced_run(tmp_path, good_run):
    run = copy_run(good_run, tmp_path / "run")
    assert (run / "model_ema.safetensors").exists()
    Trainer(tiny_config(run, epochs=1), overwrite=True).fit(progress=False)  # no EMA this time
    assert not (run / "model_ema.safetensors").exists() and (run / "model.safetensors").exists()
    assert not (run / "best" / "model_ema.safetensors").exists() and (run / "best" / "config.json").exists()


def test_a_folder_with_run_files_but_no_checkpoint_is_not_sent_round_in_circles(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch\n")
    recipe = write_tiny_recipe(tmp_path, tmp_path)
    refused = run_cli("vitblocks.train", recipe, "--no-progress", "--resume", "auto")
    assert_clear_error(refused, "already holds files a run writes (metrics.csv)", "--overwrite")
    assert "--resume auto" not in refused.stderr


# ---- a different batch size on resume --------------------------------------------

def record_samples(monkeypatch):
    seen = []
    iterate = ResumableSampler.__iter__

    def recording(self):
        indices = list(iterate(self))
        if self.shuffle:
            seen.append((self.epoch, indices))
        return iter(indices)

    monkeypatch.setattr(ResumableSampler, "__iter__", recording)
    return seen


def test_resuming_at_another_batch_size_sees_each_sample_once_at_the_fresh_runs_learning_rate(tmp_path, monkeypatch):
    seen = record_samples(monkeypatch)
    first = tiny_config(tmp_path / "run", epochs=2)
    first.checkpoint.every_steps = 2
    trainer = Trainer(first)

    def crash_after_step_2(trainer):
        if trainer.state.step == 2:
            raise KeyboardInterrupt

    trainer.callbacks.append(OnStepEnd(crash_after_step_2))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(progress=False)
    assert load_training_checkpoint(tmp_path / "run" / "last.pth")["batch"] == 2  # 16 of 48 samples
    before = seen[-1][1][:16]

    resumed = Trainer(tiny_config(tmp_path / "run", epochs=2, data=type(first.data)(
        **{**vars(first.data), "batch_size": 16})))
    resumed.resume(tmp_path / "run" / "last.pth")
    lrs = []
    resumed.callbacks.append(OnStepEnd(lambda t: lrs.append((t.state.epoch, t.optimizer.param_groups[0]["lr"]))))
    seen.clear()
    resumed.fit(progress=False)
    epoch_0_rest = seen[0][1]
    assert sorted(before + epoch_0_rest) == list(range(48))  # every sample of the epoch once
    assert resumed.state.history[0]["epoch"] == 1

    fresh = Trainer(tiny_config(tmp_path / "fresh", epochs=2, data=resumed.config.data))
    fresh_lrs = []
    fresh.callbacks.append(OnStepEnd(lambda t: fresh_lrs.append((t.state.epoch, t.optimizer.param_groups[0]["lr"]))))
    fresh.fit(progress=False)
    assert [lr for epoch, lr in lrs if epoch == 1] == pytest.approx([lr for epoch, lr in fresh_lrs if epoch == 1])
    assert [lr for epoch, lr in lrs if epoch == 0] == pytest.approx([lr for epoch, lr in fresh_lrs if epoch == 0][1:])
    assert len(lrs) == 2 + 3  # the rest of epoch 1 (32 samples), then 48 / 16


def test_every_set_counts_in_order(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert train([recipe, "--set", "epochs=7", "--set", "seed=3", "optim.lr=2e-3", "--set", "seed=4",
                  "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs = 7" in out and "seed = 4" in out and "lr = 0.002" in out
