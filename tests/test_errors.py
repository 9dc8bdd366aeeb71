"""Every bad input a user can give the command lines is one clear error: exit code 2, a
message naming the bad value, and no traceback. Most run the command-line entry points
in this process (the same code the console runs); a few run the real subprocess."""


import pytest
import torch

from train_helpers import assert_clear_error, run_cli, tiny_config, write_tiny_recipe
from vitblocks.eval import main as eval_main
from vitblocks.summary import main as summary_main
from vitblocks.train import Trainer
from vitblocks.train.__main__ import main as train_main


def run_train(capsys, *argv):
    code = train_main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("override, fragments", [
    ("model.name=sret_tt", ["model.name='sret_tt' is not a registered model", "did you mean sret_t"]),
    ("model.kwargs.bogus_arg=1", ["takes no option 'bogus_arg'"]),
    ("model.kwargs.drop_path=0.2", ["takes no option 'drop_path'", "did you mean drop_path_rate"]),
    ("optim.opt=adamww", ["optim.opt='adamww'", "did you mean adamw"]),
    ("schedule.sched=cosin", ["schedule.sched='cosin'", "did you mean cosine"]),
    ("optim.lr=-1", ["optim.lr=-1.0 must be > 0"]),
    ("data.workers=-1", ["data.workers=-1 must be >= 0"]),
    ("data.mean=(0.5,)", ["data.mean=(0.5,) needs one value per image channel"]),
    ("data.val_fraction=0.0", ["data.val_fraction=0.0 must be between 0 and 1"]),
    ("data.val_fraction=1.5", ["data.val_fraction=1.5 must be between 0 and 1"]),
    ("augment.mixup=-1", ["augment.mixup=-1.0 must be >= 0"]),
    ("data.img_size=8", ["sret_t cannot be built from this config", "too small"]),
    ("optim.lr=1e309", ["optim.lr=inf is not a finite number"]),
    ("model.kwargs.num_classes=-1", ["model.kwargs.num_classes=-1", "set that instead"]),
    ("model.kwargs.backend=math", ["model.kwargs.backend='math'", "model.backend; set that instead"]),
    ("model.kwargs.grad_checkpointing=sqrt", ["model.kwargs.grad_checkpointing='sqrt'", "model.grad_checkpointing"]),
    ("model.kwargs.img_size=64", ["model.kwargs.img_size=64", "data.img_size; set that instead"]),
    ("data.batch_size=64", ["0 batches of 64", "(32 images per process)", "or raise data.synthetic_samples"]),
    ("optim.learning_rate=0.1", ["unknown config key 'optim.learning_rate'; did you mean optim.lr"]),  # first
])
def test_bad_overrides_are_refused_before_any_work(tmp_path, capsys, override, fragments):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    for extra in ([], ["--print-config"]):  # --print-config validates too
        if override in ("data.img_size=8", "data.batch_size=64") and extra:
            continue  # the model and the data are only built when training
        code, err = run_train(capsys, recipe, "--no-progress", "--set", override, *extra)
        assert code == 2 and "Traceback" not in err, err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # starts processes
def test_the_real_command_line_gives_the_same_clear_errors(tmp_path):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert_clear_error(run_cli("vitblocks.train", recipe, "--set", "model.name=sret_tt"), "did you mean sret_t")


def test_a_recipe_with_a_syntax_error_names_file_and_line(tmp_path, capsys):
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\nconfig = = 2\n")
    code, err = run_train(capsys, broken)
    assert code == 2 and f"{broken}:2" in err and "Traceback" not in err


def test_a_recipe_that_raises_or_is_yaml_names_the_file_the_line_and_the_fix(tmp_path, capsys):
    typo = tmp_path / "typo.py"
    typo.write_text("from vitblocks.train import TrainConfig\n\nconfig = TrainConfig(epochz=3)\n")
    code, err = run_train(capsys, typo)
    assert code == 2 and f"{typo}:3: TypeError" in err and "did you mean epochs?" in err and "Traceback" not in err
    yaml = tmp_path / "recipe.yaml"
    yaml.write_text("epochs: 3\nmodel: sret_t\n")
    code, err = run_train(capsys, yaml)
    assert code == 2 and "recipes are Python files" in err and "a .yaml file is not read" in err
    yaml_in_py = tmp_path / "recipe.py"
    yaml_in_py.write_text("epochs: 3\nmodel: sret_t\n")
    code, err = run_train(capsys, yaml_in_py)
    assert code == 2 and f"{yaml_in_py}:2: NameError: name 'sret_t' is not defined" in err


def test_models_refuse_a_negative_class_count_and_run_empty_batches():
    import timm

    for name in ("sret_t", "deit_tiny_rec_patch16_224"):
        with pytest.raises(ValueError, match=r"num_classes=-1: give the number of classes, or 0 for no classifier"):
            timm.create_model(name, num_classes=-1)
    model = timm.create_model("sret_t", num_classes=3, img_size=32, embed_dims=(16, 32, 64), num_heads=(1, 2, 4),
                              groups=((4, 2), (1,), (1,)), drop_path_rate=0.1)
    logits = model(torch.empty(0, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (0, 3) and model.head.weight.grad.abs().sum() == 0


def test_empty_and_foreign_checkpoints_on_resume(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    (tmp_path / "empty.pth").write_bytes(b"")
    code, err = run_train(capsys, recipe, "--resume", tmp_path / "empty.pth")
    assert code == 2 and "is empty (0 bytes)" in err
    assert train_main([recipe, "--no-progress"]) == 0
    for override, fragment in [("optim.opt=sgd", "optim.opt: 'adamw' in the checkpoint, 'sgd' now"),
                               ("data.num_classes=5", "data.num_classes: 4 in the checkpoint, 5 now"),
                               ("model.kwargs.embed_dims=(32,64,128)",
                                "model.kwargs.embed_dims: (16, 32, 64) in the checkpoint, (32, 64, 128) now")]:
        code, err = run_train(capsys, recipe, "--resume", "auto", "--set", "epochs=2", override)
        assert code == 2 and fragment in err and "Traceback" not in err, err


def test_unwritable_output_and_a_full_disk_say_which_file_and_that_last_is_intact(tmp_path, capsys, monkeypatch):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    (tmp_path / "file").write_text("x")
    code, err = run_train(capsys, recipe, "--output-dir", tmp_path / "file" / "run")
    assert code == 2 and "cannot create the output folder" in err
    def full_disk(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 123 vs 456")

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_train(capsys, recipe, "--no-progress")
    assert code == 2 and f"could not write {tmp_path / 'run' / 'best.pth'}" in err and "no best.pth was written" in err


def test_unreadable_images_are_named(tmp_path):
    from vitblocks.train.config.schema import DataConfig
    from vitblocks.train.errors import DataError

    for split in ("train", "val"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        (tmp_path / "data" / split / "cat" / "0.jpg").write_bytes(b"not an image")
    config = tiny_config(tmp_path / "run", data=DataConfig(dataset="imagefolder", root=str(tmp_path / "data"),
                                                          img_size=32, num_classes=1, batch_size=1, workers=0))
    with pytest.raises(DataError, match=r"no image in .*(train|val) could be read; "
                                        r"tried: .*cat/0\.jpg \(UnidentifiedImageError"):
        Trainer(config)


def test_eval_errors(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    trainer.fit(progress=False)
    capsys.readouterr()
    assert eval_main([str(tmp_path / "run" / "last.pth"), "--batch-size", "0"]) == 2
    assert "data.batch_size=0 must be >= 1" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "run" / "last.pth"), "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--data /path/to/dataset" in err and "--smoke" not in err


def test_eval_never_follows_paths_named_in_a_stored_config(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    trainer.fit(progress=False)
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    state["config"]["model"]["kwargs"]["pretrained_cfg_overlay"] = {"file": str(tmp_path / "elsewhere.pth")}
    torch.save(state, tmp_path / "edited.pth")
    capsys.readouterr()
    assert eval_main([str(tmp_path / "edited.pth")]) == 0


def test_messages_without_text_or_from_loader_workers_stay_one_clear_line():
    from vitblocks.train.__main__ import _message
    from vitblocks.train.errors import DataError

    assert _message(FileNotFoundError()) == "FileNotFoundError (no message)"
    assert _message(FileNotFoundError(2, "No such file or directory", "/x.pth")) == "No such file or directory: /x.pth"
    worker = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
                       "  File \"x.py\", line 1\nvitblocks.train.data.datasets.DataError: 101 images cannot be decoded")
    assert _message(worker) == "101 images cannot be decoded"


def test_a_missing_weights_file_is_named(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    code, err = run_train(capsys, recipe, "--set", "model.kwargs.pretrained=True",
                          "--set", "model.kwargs.pretrained_cfg_overlay={'file': '/nonexistent.pth'}")
    assert code == 2 and "no weights file at '/nonexistent.pth'" in err and "Traceback" not in err


def test_eval_refuses_non_finite_weights(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path / "run", epochs=1))
    trainer.fit(progress=False)
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    state["model"]["head.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    capsys.readouterr()
    assert eval_main([str(tmp_path / "nan.pth")]) == 2
    assert "are not finite (NaN or infinity in 1 tensors: head.weight)" in capsys.readouterr().err


@pytest.mark.slow  # starts processes
def test_summary_out_of_memory_is_exit_2_with_advice():
    result = run_cli("vitblocks.summary", "sret_t", "--img-size", "100000")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "needs more memory than this machine has" in result.stderr and "smaller --img-size" in result.stderr


def test_summary_errors():
    with pytest.raises(SystemExit, match=r"/missing\.md does not exist"):
        summary_main(["sret_t", "--zoo", "--update", "/missing.md"])
    with pytest.raises(SystemExit, match=r"sret_t cannot be built at --img-size 8: .*too small"):
        summary_main(["sret_t", "--img-size", "8"])


def test_layers_name_the_bad_argument():
    import timm

    from vitblocks import SlicedGroupAttention
    from vitblocks.attention import group_attention

    attn = SlicedGroupAttention(16, 2)
    with pytest.raises(ValueError, match=r"expects tokens of shape \(batch, tokens, 16\), got \(4, 16\)"):
        attn(torch.randn(4, 16))
    with pytest.raises(ValueError, match=r"got \(1, 2, 4, 16\)"):
        attn(torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="loop=-1 must be >= 0"):
        attn(torch.randn(1, 8, 16), loop=-1)
    with pytest.raises(ValueError, match="img_size=-5 must be positive"):
        timm.create_model("sret_t", img_size=-5)
    with pytest.raises(ValueError, match="loops=0: every entry must be an int >= 1"):
        timm.create_model("sret_t", loops=0)
    with pytest.raises(TypeError, match="img_size='224' must be an int"):
        timm.create_model("sret_t", img_size="224")
    q = torch.randn(1, 2, 49, 8)  # (batch, heads, tokens, head_dim): the wrong layout
    with pytest.raises(ValueError, match=r"takes \(batch, tokens, heads, head_dim\).*q\.transpose\(1, 2\)"):
        group_attention(q, q, q, groups=8)


def test_read_checkpoint_takes_safetensors_and_refuses_a_damaged_one(tmp_path):
    from safetensors.torch import save_file

    from vitblocks.io import CheckpointError, read_checkpoint

    weights = {"w": torch.arange(6.0).view(2, 3)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(read_checkpoint(tmp_path / "w.safetensors")["w"], weights["w"])
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:20])
    with pytest.raises(CheckpointError, match="could not read .*cut.safetensors.* as a safetensors file"):
        read_checkpoint(tmp_path / "cut.safetensors")


def test_a_missing_data_root_is_named_rather_than_the_split_under_it(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    code, err = run_train(capsys, recipe, "--no-progress", "--set", "data.dataset=imagefolder",
                          f"data.root={tmp_path / 'data' / 'imagenet'}")
    assert code == 2 and f"but {tmp_path / 'data'} does not exist" in err, err
