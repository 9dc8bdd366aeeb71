"""Checkpoints and run folders that cross between vitblocks and timm's own tools."""

import argparse

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import load_checkpoint

from train_helpers import TINY_SRET, tiny_config
from vitblocks import eval as vitblocks_eval
from vitblocks.io import CheckpointError
from vitblocks.train import DataConfig, Trainer
from vitblocks.train.data.datasets import split_folder
from vitblocks.train.outputs.checkpoint import load_training_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run with EMA weights, on an ImageFolder whose validation split is named as timm's scripts name it."""
    root = tmp_path_factory.mktemp("interop")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 4)):
        for shade, name in ((60, "ant"), (180, "bee")):
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((36, 36, 3)) * 60 + shade - 30).astype(np.uint8)
                Image.fromarray(pixels).save(root / "data" / split / name / f"{i}.png")
    data = DataConfig(dataset="imagefolder", root=str(root / "data"), img_size=32, num_classes=2, batch_size=4,
                      workers=0, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.9)
    trainer = Trainer(tiny_config(root / "run", epochs=1, data=data, ema_decay=0.5))
    trainer.fit(progress=False)
    return trainer


def test_eval_runs_with_the_backend_and_precision_of_the_run_or_those_given(run, monkeypatch):
    from vitblocks.attention import requested_backend

    seen, real_evaluate = [], vitblocks_eval.evaluate

    def recording(model, *args, **kwargs):
        model.register_forward_pre_hook(lambda *_: seen.append((requested_backend(), torch.is_autocast_enabled("cpu"))))
        return real_evaluate(model, *args, **kwargs)

    monkeypatch.setattr(vitblocks_eval, "evaluate", recording)
    last = str(run.output_dir / "last.pth")
    as_trained = vitblocks_eval.run(last)
    assert set(seen) == {(run.config.model.backend, False)}
    seen.clear()
    given = vitblocks_eval.run(last, overrides=["model.backend=math", "precision=bf16"])
    assert set(seen) == {("math", True)}
    assert given["val_top1"] == pytest.approx(as_trained["val_top1"], abs=100 / 8 + 1e-6)  # one image at most


def test_the_run_folder_is_a_timm_model_folder(run):
    out = run.output_dir
    for folder in (out, out / "best"):
        assert {"config.json", "model.safetensors", "model_ema.safetensors"} <= {p.name for p in folder.iterdir()}
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    assert [tuple(cfg[key]) for key in ("input_size", "mean", "std")] == [(3, 32, 32), (0.5,) * 3, (0.25,) * 3]
    assert cfg["crop_pct"] == 0.9 and cfg["num_classes"] == 2
    images = next(iter(run.data.val_loader()))[0]
    run.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), run.model(images), rtol=0, atol=0)
    assert split_folder(run.config.data.root, "val").name == "validation"


def test_timms_load_checkpoint_takes_the_ema_weights_of_best_pth(run):
    best = run.output_dir / "best.pth"
    saved = load_training_checkpoint(best)
    model = timm.create_model("sret_t", num_classes=2, img_size=32, **TINY_SRET)
    load_checkpoint(model, str(best), use_ema=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved["state_dict_ema"].items())
    assert any(not torch.equal(saved["model"][k], v) for k, v in saved["ema"].items())  # EMA weights differ
    load_checkpoint(model, str(best), use_ema=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved["model"].items())


def same(metrics, reference):
    """The same counts; the loss up to summation order (other batch sizes)."""
    return (metrics["val_top1"], metrics["val_top5"]) == (reference["val_top1"], reference["val_top5"]) and \
        metrics["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)


def test_eval_reads_timm_train_checkpoints_and_bare_state_dicts(run, tmp_path):
    data_root, last = run.config.data.root, run.output_dir / "last.pth"
    reference = vitblocks_eval.run(str(last))
    saved = load_training_checkpoint(last)
    timm_style = {"epoch": 1, "arch": "sret_t", "state_dict": saved["model"], "state_dict_ema": saved["ema"],
                  "args": argparse.Namespace(model="sret_t", num_classes=2, img_size=32, mean=(0.5,) * 3,
                                             std=(0.25,) * 3, crop_pct=0.9, interpolation="bicubic")}
    torch.save(timm_style, tmp_path / "model_best.pth.tar")
    torch.save(saved["model"], tmp_path / "state_dict.pth")
    kwargs = dict(TINY_SRET)
    assert same(vitblocks_eval.run(str(tmp_path / "model_best.pth.tar"), data_root, model="sret_t",
                                   model_kwargs=kwargs), reference)
    # the image size as a model argument, as fixed-size models need it
    assert same(vitblocks_eval.run(str(tmp_path / "model_best.pth.tar"), data_root, model="sret_t",
                                   model_kwargs=dict(kwargs, img_size=32)), reference)
    # a bare state dict says nothing of its preprocessing: the run's is given with --set
    bare = vitblocks_eval.run(str(tmp_path / "state_dict.pth"), data_root, model="sret_t", model_kwargs=kwargs,
                              overrides=["data.img_size=32", "data.mean=(0.5,0.5,0.5)", "data.std=(0.25,0.25,0.25)",
                                         "data.crop_pct=0.9"])
    assert same(bare, reference)
    ema = vitblocks_eval.run(str(tmp_path / "model_best.pth.tar"), data_root, model="sret_t", model_kwargs=kwargs,
                             ema=True)
    assert same(ema, vitblocks_eval.run(str(last), ema=True))
    with pytest.raises(CheckpointError, match=r"is a timm train.py checkpoint, not a vitblocks training checkpoint.*"
                                              r"--model NAME"):
        vitblocks_eval.run(str(tmp_path / "model_best.pth.tar"), data_root)
    with pytest.raises(CheckpointError, match=r"is a bare state dict, not a vitblocks training checkpoint"):
        vitblocks_eval.run(str(tmp_path / "state_dict.pth"), data_root)
    with pytest.raises(CheckpointError, match=r"do not fit sret_t .* give the model's arguments with --model-kwargs"):
        vitblocks_eval.run(str(tmp_path / "state_dict.pth"), data_root, model="sret_t")
    assert vitblocks_eval.main([str(tmp_path / "model_best.pth.tar"), "--data", data_root, "--model", "sret_t",
                                "--model-kwargs", *(f"{k}={v!r}" for k, v in kwargs.items())]) == 0
