import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_helpers import doubled_batch_config, tiny_config
from vitblocks.io import CheckpointError, save_atomic
from vitblocks.train import ConfigError, OnStepEnd, Trainer, TrainingDiverged, load_recipe
from vitblocks.train.data.datasets import ResumableSampler
from vitblocks.train.outputs.checkpoint import load_training_checkpoint

pytestmark = pytest.mark.slow  # trains or starts processes: left out of the quick subset

DRIVER = Path(__file__).with_name("train_driver.py")


TIMING = ("train_img_s", "step_img_s", "data_wait_s", "epoch_seconds")


def read_metrics(run, timing=True):
    with open(Path(run) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return rows if timing else [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def drive(output_dir, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(DRIVER), str(output_dir), *args],
                          capture_output=True, text=True, env=env)


def test_a_run_writes_metrics_checkpoints_plot_and_safetensors(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, ema_decay=0.9))
    result = trainer.fit(progress=False)
    rows = read_metrics(tmp_path)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "lr", "train_img_s"} <= rows[0].keys()
    for name in ("last.pth", "best.pth", "model.safetensors", "model_ema.safetensors", "curves.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    weights = load_file(tmp_path / "model.safetensors")
    assert torch.equal(weights["head.weight"], trainer.model.head.weight.detach())
    assert result["best_top1"] == max(float(r["val_top1"]) for r in rows)
    out = capsys.readouterr().out
    assert "best top-1" in out and "train img/s" in out and str(tmp_path / "model.safetensors") in out
    assert trainer.step == 2 * 6  # 48 samples / batch 8, two epochs


def test_the_log_states_the_step_and_splits_loader_wait_from_step_time(tmp_path, monkeypatch, capsys):
    import time

    import vitblocks.train.data.feed as feed

    make_loader = feed.make_loader

    class SlowLoader:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for batch in self.loader:
                time.sleep(0.05)
                yield batch

    monkeypatch.setattr(feed, "make_loader", lambda *args, **kwargs: SlowLoader(make_loader(*args, **kwargs)))
    config = tiny_config(tmp_path, epochs=1)
    config.optim.accum_steps = 2
    Trainer(config).fit(progress=False)
    out = capsys.readouterr().out
    assert "step     compile=none (model.compile=False); AdamW (fused), 2 batches per update; losses read from " \
           "the device every 10 steps" in out
    row = read_metrics(tmp_path)[0]
    assert float(row["data_wait_s"]) >= 6 * 0.05 and float(row["step_img_s"]) > float(row["train_img_s"])
    assert float(row["data_wait_s"]) < float(row["epoch_seconds"])
    from vitblocks.train.run.compile_modes import describe_compile

    assert describe_compile("auto", torch.device("cuda")) == (
        "compile=none (model.compile='auto' on cuda: eager until a GPU run has timed the modes)")
    assert describe_compile("graphs", torch.device("cuda")) == "compile=graphs (model.compile='graphs')"


def test_schedule_warms_up_then_decays_per_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=3))
    lrs = []
    trainer.callbacks.append(OnStepEnd(lambda t: lrs.append(t.optimizer.param_groups[0]["lr"])))
    trainer.fit(progress=False)
    # one warmup epoch (6 updates) rising linearly, then cosine decay (timm/DeiT: warmup overlaps the cosine)
    assert lrs[:5] == sorted(lrs[:5]) and lrs[0] < max(lrs) / 4 and lrs.index(max(lrs)) == 4
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-5)


def test_weight_decay_skips_biases_norms_and_the_position_map(tmp_path):
    trainer = Trainer(tiny_config(tmp_path))
    decayed = {id(p) for g in trainer.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in decayed}
    assert "pos_embed.weight" not in names and not any(n.endswith(".bias") for n in names)
    assert "head.weight" in names


def test_learning_rate_scales_with_global_batch(tmp_path):
    config = tiny_config(tmp_path)
    config.optim.lr, config.optim.accum_steps = None, 2
    assert Trainer(config).lr == pytest.approx(1e-3 * 16 / 512)


def test_accumulation_steps_the_optimizer_every_n_batches(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    config.optim.accum_steps = 3
    config.optim.clip_grad = 1.0
    trainer = Trainer(config)
    trainer.fit(progress=False)
    assert trainer.step == 2


def test_killed_run_resumes_to_the_same_result(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    assert drive(reference).returncode == 0
    killed = drive(interrupted, "--kill-at-step", "9")
    assert killed.returncode == -signal.SIGKILL
    state = load_training_checkpoint(interrupted / "last.pth")
    assert (state["epoch"], state["batch"]) == (1, 2)  # mid-epoch, from the step-8 checkpoint
    resumed = drive(interrupted, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(interrupted, timing=False) == read_metrics(reference, timing=False)
    final, expected = load_file(interrupted / "model.safetensors"), load_file(reference / "model.safetensors")
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    # a stop signal (to the whole process group, as clusters send it) is tests/test_faults.py's


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    config = tiny_config(tmp_path, epochs=2)
    config.checkpoint.every_steps = 2
    trainer = Trainer(config)

    def poison(trainer):
        if trainer.state.step == 7:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))

    trainer.callbacks.append(OnStepEnd(poison))
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 8 \(epoch 2, batch 2\).*last\.pth"):
        trainer.fit(progress=False)
    state = load_training_checkpoint(tmp_path / "last.pth")
    assert state["step"] == 6 and torch.isfinite(state["model"]["head.weight"]).all()


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    trainer.fit(progress=False)
    data = (tmp_path / "run" / "last.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        trainer.resume(tmp_path / "cut.pth")
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a vitblocks training checkpoint"):
        trainer.resume(tmp_path / "other.pth")
    other = Trainer(tiny_config(tmp_path / "x",
                                model=type(trainer.config.model)("sret_lt", kwargs=trainer.config.model.kwargs)))
    with pytest.raises(CheckpointError, match="model.name: 'sret_t' in the checkpoint, 'sret_lt' now"):
        other.resume(tmp_path / "run" / "last.pth")


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    save_atomic({"a": torch.ones(2)}, tmp_path / "c.pth")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"a": torch.zeros(2)}, tmp_path / "c.pth")
    assert torch.load(tmp_path / "c.pth", weights_only=True)["a"].equal(torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]


def test_fp16_on_cpu_is_refused_and_bf16_runs(tmp_path):
    with pytest.raises(ConfigError, match="fp16.*CUDA"):
        Trainer(tiny_config(tmp_path, precision="fp16"))
    Trainer(tiny_config(tmp_path, precision="bf16", epochs=1)).fit(progress=False)


def torchrun(output_dir, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(DRIVER),
         str(output_dir), *args],
        capture_output=True, text=True, env=env, timeout=300,
    )


def test_two_gloo_processes_end_with_identical_weights_also_after_a_sigterm_and_resume(tmp_path):
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    result = torchrun(reference, "--save-rank-weights")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Grad strides do not match bucket view strides" not in result.stderr
    rank0, rank1 = (torch.load(reference / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert len(read_metrics(reference)) == 2  # written once, by rank 0
    # SIGTERM to rank 1 after step 3 of epoch 1 (every_steps=2: the cadence alone would have saved step 2)
    signalled = torchrun(stopped, "--signal-at-step", "3", "--signal-rank", "1")
    assert signalled.returncode != 0 and "exitcode  : 75" in signalled.stderr, signalled.stderr[-3000:]
    # both processes stop at the same step; the main one writes (torchrun ends the other once one exits)
    assert "rank 1: stopped by SIGTERM at step 3 (epoch 1, batch 3)" in signalled.stderr
    assert f"rank 0: stopped because another process was asked to stop at step 3 (epoch 1, batch 3); saved {stopped}" \
        in signalled.stderr
    state = load_training_checkpoint(stopped / "last.pth")
    assert (state["step"], state["batch"], state["epoch_samples"], state["world_size"]) == (3, 3, 48, 2)
    # a signal while evaluating stops after the epoch's checkpoints, which every process writes together
    at_epoch_end = torchrun(tmp_path / "epoch_end", "--signal-at-epoch-end", "1", "--signal-rank", "1")
    assert "exitcode  : 75" in at_epoch_end.stderr, at_epoch_end.stderr[-3000:]
    assert f"rank 0: stopped because another process was asked to stop at step 3 (epoch 1, batch 0); saved {tmp_path}" \
        in at_epoch_end.stderr
    assert load_training_checkpoint(tmp_path / "epoch_end" / "last.pth")["epoch"] == 1
    resumed = torchrun(stopped, "--resume", "--save-rank-weights")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_metrics(stopped, timing=False) == read_metrics(reference, timing=False)
    for rank in (0, 1):
        final = torch.load(stopped / f"rank{rank}.pt", weights_only=True)
        for key in rank0:
            assert torch.equal(final[key], rank0[key]), (rank, key)


def test_two_processes_compute_one_process_at_the_doubled_batch_and_reduce_only_on_updates(tmp_path):
    result = torchrun(tmp_path / "two", "--doubled-batch-check")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP with gradients as bucket views, all-reducing only each update's last batch (no_sync)" in (
        result.stdout + result.stderr)
    for rank in (0, 1):  # 4 batches, 2 per update: only the backward of each update's last batch all-reduces
        reduced_at = json.loads((tmp_path / "two" / f"reduced{rank}.json").read_text())
        assert reduced_at and set(reduced_at) == {1, 3} and reduced_at.count(1) == reduced_at.count(3)
    one = Trainer(doubled_batch_config(tmp_path / "one", batch_size=16))
    one.fit(progress=False)
    two = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    for key, value in one.model.state_dict().items():
        # AdamW divides by the root of tiny second moments: a weight whose gradient is near 0 moves by up to ~1e-5
        # on float rounding of the two batch sizes alone
        torch.testing.assert_close(two[key], value, atol=1e-5, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    assert float(read_metrics(tmp_path / "two")[0]["train_loss"]) == pytest.approx(
        float(read_metrics(tmp_path / "one")[0]["train_loss"]), rel=1e-5)


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    sampler = ResumableSampler(20, shuffle=True, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=8)
    assert list(sampler) == full[8:]
    sampler.set_epoch(3)
    assert list(sampler) != full and sorted(list(sampler)) == list(range(20))
    shares = []
    for rank in (0, 1, 2):
        s = ResumableSampler(20, True, seed=3, rank=rank, world_size=3)
        s.set_epoch(0)
        shares.append(list(s))
    assert len({len(s) for s in shares}) == 1 and set().union(*shares) == set(range(20))
    for rank in (0, 1):  # a global skip of 2k samples over 2 ranks is each rank's first k
        s = ResumableSampler(20, True, seed=3, rank=rank, world_size=2)
        s.set_epoch(1)
        whole = list(s)
        s.set_epoch(1, skip=6)
        assert list(s) == whole[3:] and len(s) == len(whole) - 3
    shares = []  # resumed on 3 processes after 8 samples: the rest of the order, shared equally
    for rank in range(3):
        s = ResumableSampler(20, True, seed=3, rank=rank, world_size=3)
        s.set_epoch(1, skip=8)
        shares.append(list(s))
    full_order = ResumableSampler(20, True, seed=3)
    full_order.set_epoch(1)
    assert len({len(share) for share in shares}) == 1 and set(list(full_order)[8:]) <= set().union(*shares)
    assert sum(map(len, shares)) - 12 < 2 * 3  # at most two rounds of padding repeat samples
    repeated = ResumableSampler(30, True, repeats=3)
    assert len(list(repeated)) == 30 and len(set(repeated)) == 10


def test_quickstart_reaches_95_percent(tmp_path):
    config = load_recipe("recipes/quickstart.py")
    result = Trainer(config, output_dir=tmp_path).fit(progress=False)
    assert result["val_top1"] >= 95.0


def test_recipe_model_options_reach_the_model(tmp_path, monkeypatch):
    from vitblocks.attention import requested_backend

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)
    config = tiny_config(tmp_path, epochs=1)
    config.model.grad_checkpointing = "sqrt"
    config.model.backend = "math"
    config.model.compile = True
    trainer = Trainer(config)
    assert compiled == [trainer.model]
    assert all(b.grad_checkpointing == "sqrt" for s in trainer.model.stages for b in s.blocks)
    seen = []
    trainer.callbacks.append(OnStepEnd(lambda _: seen.append(requested_backend())))
    trainer.fit(progress=False)
    assert set(seen) == {"math"}


def test_progress_bar_shows_loss_lr_and_throughput(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, epochs=1)).fit(progress=True)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "lr=" in err and "img_s=" in err


def test_tensorboard_is_written_only_when_asked_and_overwrite_removes_it(tmp_path):
    pytest.importorskip("tensorboard", reason="the tracking extra: pip install -e '.[tracking]'")
    Trainer(tiny_config(tmp_path, epochs=1)).fit(progress=False)
    assert (tmp_path / "metrics.csv").is_file() and not (tmp_path / "tensorboard").exists()
    config = tiny_config(tmp_path, epochs=1)
    config.logging.tensorboard = True
    Trainer(config, overwrite=True).fit(progress=False)
    assert any((tmp_path / "tensorboard").iterdir())
    Trainer(tiny_config(tmp_path, epochs=1), overwrite=True).fit(progress=False)
    assert not (tmp_path / "tensorboard").exists()


def test_regional_compilation_is_a_recipe_option(tmp_path, monkeypatch):
    from vitblocks.layers import Recursive

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the wiring, not inductor, is under test
    config = tiny_config(tmp_path, epochs=1)
    config.model.compile = "regional"
    trainer = Trainer(config)
    assert trainer.train_model is trainer.model
    assert all(m.compiled for m in trainer.model.modules() if isinstance(m, Recursive))
    trainer.fit(progress=False)


def test_regional_compilation_of_a_model_without_recursion_is_a_config_error(tmp_path):
    config = tiny_config(tmp_path, epochs=1)
    config.model = type(config.model)("deit_tiny_patch16_224", kwargs=dict(patch_size=8))
    config.model.compile = "regional"
    with pytest.raises(ConfigError, match="no Recursive block.*model.compile=True"):
        Trainer(config)


def test_builders_make_each_part_without_a_trainer_and_the_trainer_takes_them(tmp_path):
    from vitblocks.train import TrainingState, build_criterion, build_data, build_model, build_optimizer_and_schedule

    config = tiny_config(tmp_path, epochs=1)
    data = build_data(config)
    assert (data.steps_per_epoch, data.updates_per_epoch) == (6, 6) and len(data.val_set) > 0
    model = build_model(config)
    optimizer, scheduler, lr = build_optimizer_and_schedule(model, config, data.updates_per_epoch)
    mixup, criterion = build_criterion(config)
    assert lr == config.optim.lr and mixup is not None
    seen = []
    trainer = Trainer(config, model=model, data=data, optimizer=(optimizer, scheduler), criterion=(mixup, criterion),
                      callbacks=[OnStepEnd(lambda run: seen.append((run.state.step, run)))])
    assert trainer.model is model and trainer.optimizer is optimizer
    trainer.fit(progress=False)
    assert [step for step, _ in seen] == list(range(1, 7))
    assert not (tmp_path / "metrics.csv").exists()  # no logging callback given
    with pytest.raises(ValueError, match="the Data handed to Trainer has no train_feed / val_feed: build it with"):
        Trainer(config, data=dataclasses.replace(data, train_feed=None), callbacks=[])
    run = seen[0][1]  # callbacks see a read-only view of the run, not the trainer
    assert run is not trainer and run.model is model and run.state is trainer.state and run.resumed is False
    assert "parameters" in run.header and run.stop_requested() is None
    with pytest.raises(AttributeError, match="a callback sees the run through a RunView .*; it has no 'scheduler'"):
        run.scheduler  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        run.state = None
    restored = TrainingState()
    restored.load_state_dict(trainer.state.state_dict())
    assert restored == trainer.state and restored.epoch == 1 and restored.step == 6
