"""Files written before the architecture redesign still load and give the same outputs.

`tests/fixtures/pre_redesign/` was written by vitblocks before the package was split into
io / models / train builders: a trainer checkpoint of a tiny SReT, its safetensors
weights and official-layout export, plugged DeiT and Swin weights, and the logits all of
them gave on a fixed input.
"""

import dataclasses
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import vitblocks  # noqa: F401  (registers the models used below)
from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.models.official import load_official_checkpoint
from vitblocks.train.config.recipe import from_dict
from vitblocks.train.outputs.checkpoint import load_training_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"
EXPECTED = torch.load(FIXTURES / "expected.pt", weights_only=True)


def _sret_from_old_config():
    state = load_training_checkpoint(FIXTURES / "last.pth")
    config = from_dict(state["config"])
    model = timm.create_model(config.model.name, num_classes=config.data.num_classes, img_size=config.data.img_size,
                              **config.model.kwargs)
    return state, config, model.eval()


def test_old_trainer_checkpoint_config_and_weights_load():
    state, config, model = _sret_from_old_config()
    assert config.model.backend == "auto"  # stored as model.attn_backend before the rename
    model.load_state_dict(state["model"])
    torch.testing.assert_close(model(EXPECTED["input"]), EXPECTED["sret_logits"])


def test_old_safetensors_and_official_export_give_the_old_logits():
    _, _, model = _sret_from_old_config()
    model.load_state_dict(load_file(FIXTURES / "model.safetensors"))
    torch.testing.assert_close(model(EXPECTED["input"]), EXPECTED["sret_logits"])
    official = load_official_checkpoint(FIXTURES / "official.pth", model)
    torch.testing.assert_close(official(EXPECTED["input"]), EXPECTED["sret_logits"])


def test_old_trainer_checkpoint_evaluates_and_resumes(tmp_path):
    metrics = evaluate_checkpoint(str(FIXTURES / "last.pth"))
    assert 0.0 <= metrics["val_top1"] <= 100.0
    from vitblocks.train.run.engine import Trainer

    state, config, _ = _sret_from_old_config()
    trainer = Trainer(dataclasses.replace(config, epochs=2, output_dir=str(tmp_path)))
    trainer.resume(FIXTURES / "last.pth")
    assert trainer.state.epoch == 1 and trainer.state.step == state["step"]
    trainer.fit(progress=False)
    assert trainer.state.epoch == 2


@pytest.mark.parametrize("name, file, kwargs, key", [
    ("deit_tiny_rec_sliced_patch16_224", "deit_rec_sliced.safetensors",
     dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=1, num_classes=3), "deit_logits"),
    ("swin_tiny_rec_patch4_window7_224", "swin_rec.safetensors",
     dict(img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 1), num_classes=3),
     "swin_logits"),
])
def test_old_plugged_weights_load_with_the_same_keys_and_logits(name, file, kwargs, key):
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(load_file(FIXTURES / file))
    torch.testing.assert_close(model(EXPECTED["input"]), EXPECTED[key])


RELEASED_RUN = Path(__file__).parent / "fixtures" / "run_before_rooms"
"""A whole run folder written by the release before the trainer was split into rooms (commit bf974d7):
one epoch of a tiny SReT on synthetic data, with EMA, and the TensorBoard folder that release always wrote."""

RELEASED_RECIPE = """
from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig("sret_t", kwargs=dict(embed_dims=(8, 16, 32), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1),
                                            groups=((4, 2), (1,), (1,)), mlp_ratio=2.0)),
    data=DataConfig(dataset="synthetic", img_size=32, num_classes=4, batch_size=8, workers=0, synthetic_samples=32),
    augment=AugmentConfig(auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1),
    optim=OptimConfig(lr=1e-3), schedule=ScheduleConfig(warmup_epochs=0), epochs=2, ema_decay=0.9,
    output_dir=OUTPUT,
)
"""


def test_a_run_folder_of_the_previous_release_evaluates_and_resumes(tmp_path, capsys):
    import shutil

    from vitblocks.train.__main__ import main as train

    run = tmp_path / "run"
    shutil.copytree(RELEASED_RUN, run)
    before = evaluate_checkpoint(str(run / "last.pth"))
    assert before == evaluate_checkpoint(str(RELEASED_RUN / "last.pth"))
    assert timm.create_model(f"local-dir:{run}") is not None  # its model folder, as timm reads it
    recipe = tmp_path / "recipe.py"
    recipe.write_text(RELEASED_RECIPE.replace("OUTPUT", repr(str(run))))
    assert train([str(recipe), "--resume", "auto", "--no-progress"]) == 0
    assert "resuming at epoch 2 of 2" in capsys.readouterr().out
    state = load_training_checkpoint(run / "last.pth")
    assert state["epoch"] == 2 and state["step"] == 2 * load_training_checkpoint(RELEASED_RUN / "last.pth")["step"]
    assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]
    evaluate_checkpoint(str(run / "last.pth"))


def test_a_stored_config_that_gave_the_backend_in_model_kwargs_evaluates_and_resumes(tmp_path):
    """Earlier releases let `model.kwargs.backend` / `grad_checkpointing` reach the model; today they are
    refused in a recipe, and a stored config is read in today's spelling (model.backend, ...)."""
    from vitblocks.train.run.engine import Trainer

    state = torch.load(RELEASED_RUN / "last.pth", weights_only=True)
    state["config"]["model"]["kwargs"].update(backend="math", grad_checkpointing="sqrt")
    torch.save(state, tmp_path / "last.pth")
    with_math = evaluate_checkpoint(str(tmp_path / "last.pth"))  # runs with the math backend: rounding differs
    assert with_math == pytest.approx(evaluate_checkpoint(str(RELEASED_RUN / "last.pth")), rel=1e-5)
    config = from_dict(state["config"])
    assert (config.model.backend, config.model.grad_checkpointing) == ("math", "sqrt")
    assert not {"backend", "grad_checkpointing"} & set(config.model.kwargs)
    trainer = Trainer(dataclasses.replace(config, epochs=2, output_dir=str(tmp_path / "run")))
    trainer.resume(tmp_path / "last.pth")  # the same run in today's spelling: nothing to allow
    assert trainer.state.step == state["step"]
