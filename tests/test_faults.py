"""Faults as a cluster delivers them: stop signals to the whole process group, a loader worker
killed by the out-of-memory killer, a stop before the first step. Each writes a checkpoint at
the last finished step and exits 75, and the run resumes from it bit-identically."""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitblocks.train.run.engine as engine
from train_helpers import tiny_config, write_digit_folder, write_folder_recipe, write_tiny_recipe
from vitblocks.train import Callback, Trainer, TrainingInterrupted, load_recipe
from vitblocks.train.__main__ import main as train
from vitblocks.train.outputs.checkpoint import load_training_checkpoint
from vitblocks.train.outputs.run_lock import LOCK_NAME
from vitblocks.train.process.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow  # trains and starts processes: left out of the quick subset

DRIVER = Path(__file__).parent / "fault_driver.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@contextlib.contextmanager
def one_thread():
    """As the driver runs, so that weights computed here and there are bit-identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digit_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def reference(digits, tmp_path_factory):
    """The final weights and metrics of the run never stopped."""
    folder = tmp_path_factory.mktemp("reference")
    with one_thread():
        trainer = Trainer(load_recipe(write_folder_recipe(folder / "recipe.py", digits, folder / "run")))
        trainer.fit(progress=False)
    return trainer.model.state_dict(), trainer.state.history


def resume_matches(recipe, run, reference):
    with one_thread():
        trainer = Trainer(load_recipe(recipe))
        trainer.resume(run / "last.pth")
        trainer.fit(progress=False)
    weights, history = reference
    for key, value in weights.items():
        assert torch.equal(trainer.model.state_dict()[key], value), key
    assert [row["val_loss"] for row in trainer.state.history] == [row["val_loss"] for row in history]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_whole_process_group_stops_at_the_step_and_resumes_bit_identically(tmp_path, digits,
                                                                                           reference, name):
    recipe = write_folder_recipe(tmp_path / "recipe.py", digits, tmp_path / "run")  # two loader workers
    process = subprocess.Popen([sys.executable, str(DRIVER), "4", "wait", recipe, "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                               start_new_session=True)
    for line in process.stdout:
        if line.startswith("waiting for a signal"):  # inside step 4, its loader workers running
            os.killpg(process.pid, signal.Signals[name])  # from outside, as slurmstepd or the terminal sends it
            break
    _, err = process.communicate(timeout=300)
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"stopped by {name} at step 4 (epoch 1, batch 4); saved {tmp_path}/run/last.pth. "
                          f"Continue with: python -m vitblocks.train {recipe} --no-progress --resume auto"), err
    assert load_training_checkpoint(tmp_path / "run" / "last.pth")["step"] == 4
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    resume_matches(recipe, tmp_path / "run", reference)


def test_a_loader_worker_killed_by_the_oom_killer_is_named_and_the_run_stops_with_a_checkpoint(
        tmp_path, digits, reference):
    recipe = write_folder_recipe(tmp_path / "recipe.py", digits, tmp_path / "run")
    killed = subprocess.run([sys.executable, str(DRIVER), "4", "kill-worker", recipe, "--no-progress"],
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert killed.returncode == PREEMPTED_EXIT_CODE, killed.stderr[-3000:]
    pid = next(line.split()[-1] for line in killed.stdout.splitlines() if line.startswith("killing worker"))
    assert killed.stderr.startswith(
        f"stopped because loader worker pid {pid} was killed by SIGKILL (most likely the out-of-memory killer: lower "
        "data.workers or data.batch_size, or give the job more memory) at step 4 (epoch 1, batch 4); saved "
        f"{tmp_path}/run/last.pth. Continue with:"), killed.stderr
    assert len(killed.stderr.strip().splitlines()) == 1 and "Traceback" not in killed.stderr  # none as workers end
    resume_matches(recipe, tmp_path / "run", reference)


def test_a_worker_death_inside_an_accumulated_update_saves_the_last_finished_step_and_resumes_exactly(tmp_path):
    def config(folder):
        return tiny_config(folder, epochs=1, optim=type(tiny_config(folder).optim)(lr=1e-3, accum_steps=2))

    with one_thread():
        reference = Trainer(config(tmp_path / "reference"))
        reference.fit(progress=False)
        trainer = Trainer(config(tmp_path / "run"))
        real = trainer.data.train_loader

        def dying_loader(*args):
            loader = real(*args)

            class Dying:
                def __iter__(self):
                    for index, batch in enumerate(loader):
                        if index == 3:  # the second batch of update 2: update 1 finished, batches 1-3 trained on
                            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
                        yield batch

            return Dying()

        trainer.data.train_loader = dying_loader
        with pytest.raises(TrainingInterrupted, match=r"because loader worker pid 4242 was killed by SIGKILL .* at "
                                                      r"step 1 \(epoch 1, batch 2\)"):
            trainer.fit(progress=False)
        state = load_training_checkpoint(tmp_path / "run" / "last.pth")
        assert (state["step"], state["batch"], state["epoch_samples"]) == (1, 2, 16)
        resumed = Trainer(config(tmp_path / "run"))
        resumed.resume(tmp_path / "run" / "last.pth")
        resumed.fit(progress=False)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_stop_signal_during_start_up_or_before_the_first_step_exits_75_with_nothing_trained(tmp_path, monkeypatch,
                                                                                              capsys):
    recipe, run = write_tiny_recipe(tmp_path, tmp_path / "run"), tmp_path / "run"
    build = engine.build_data

    def signalled_while_building(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at once: nothing after this line runs
        return build(*args, **kwargs)

    monkeypatch.setattr(engine, "build_data", signalled_while_building)
    assert train([recipe, "--no-progress"]) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert err == ("stopped by SIGTERM during start-up, before the first step: nothing new was trained; no checkpoint "
                   f"was written. Continue with: python -m vitblocks.train {recipe} --no-progress --resume auto\n")
    assert not run.exists()
    monkeypatch.undo()

    class SignalBeforeTraining(Callback):
        def on_fit_start(self, trainer):
            os.kill(os.getpid(), signal.SIGHUP)  # recorded: the run stops before its first step

    defaults = engine.default_callbacks
    monkeypatch.setattr(engine, "default_callbacks", lambda config: [*defaults(config), SignalBeforeTraining()])
    assert train([recipe, "--no-progress"]) == PREEMPTED_EXIT_CODE
    assert capsys.readouterr().err.startswith("stopped by SIGHUP before the first step: nothing new was trained; no "
                                              "checkpoint was written. Continue with:")
    monkeypatch.undo()
    (run / "wandb-run-id").write_text("0badc0de\n")  # as a tracked start stopped before its first checkpoint leaves
    assert train([recipe, "--no-progress", "--resume", "auto"]) == 0  # what the stopped start left is no obstacle
    assert "wandb-run-id from" in capsys.readouterr().out and not (run / "wandb-run-id").exists()  # nor drawn over
    before = (run / "last.pth").read_bytes()
    monkeypatch.setattr(engine, "default_callbacks", lambda config: [*defaults(config), SignalBeforeTraining()])
    capsys.readouterr()
    assert train([recipe, "--no-progress", "--set", "epochs=2", "--resume", "auto"]) == PREEMPTED_EXIT_CODE
    err = capsys.readouterr().err
    assert err.startswith(f"stopped by SIGHUP before the first step: nothing new was trained; {run}/last.pth is "
                          "unchanged. Continue with:"), err
    assert (run / "last.pth").read_bytes() == before and not (run / LOCK_NAME).exists()
