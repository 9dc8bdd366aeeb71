"""Data that must never give a silently wrong number: classes numbered as timm numbers them (old
checkpoints keep their own order), hidden files, unreadable validation images, labels out of
range, an empty validation split."""

import io
import os
import shutil

import pytest
import torch
from PIL import Image

from train_helpers import TINY_SRET, tiny_config, write_digit_folder
from vitblocks.eval import main as eval_main
from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.io import CheckpointError
from vitblocks.train import DataConfig, Trainer, derive, load_recipe
from vitblocks.train.__main__ import main as train_main
from vitblocks.train.data.datasets import build_dataset, dataset_classes
from vitblocks.train.data.device_decode import DecodedBatches, DeviceDecode
from vitblocks.train.data.image_folder import UNREADABLE
from vitblocks.train.errors import DataError


def folder_config(tmp_path, root, num_classes=3, **data):
    return tiny_config(tmp_path / "run", epochs=1, data=DataConfig(
        dataset="imagefolder", root=str(root), img_size=32, num_classes=num_classes, batch_size=3, workers=0, **data))


def png(folder, name, shade=128):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade,) * 3).save(folder / name)


def test_classes_are_numbered_as_timm_numbers_them_file_for_file(tmp_path):
    from timm.data import ImageDataset

    root = write_digit_folder(tmp_path / "data", classes=("c1", "c2", "c10", "C3"), train_per_class=2, val_per_class=1)
    config = folder_config(tmp_path, root, num_classes=4)
    assert dataset_classes(config) == ["c1", "c2", "C3", "c10"]  # natural order, case ignored: not c1, c10, c2
    ours = {os.path.realpath(path): label for path, label in build_dataset(config, train=True).samples}
    timms = {os.path.realpath(path): label for path, label in ImageDataset(str(root / "train")).reader.samples}
    assert ours == timms


def test_hidden_files_and_folders_are_not_data(tmp_path, capsys):
    root = write_digit_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    png(root / "train" / ".ipynb_checkpoints", "0-checkpoint.png")  # would be a fourth class
    png(root / "train" / "c1" / ".ipynb_checkpoints", "0-checkpoint.png")  # would be a third c1 image
    png(root / "train" / "c2", ".thumbnail.png")
    config = folder_config(tmp_path, root)
    assert dataset_classes(config) == ["c1", "c2", "c10"]
    assert build_dataset(config, train=True).class_counts() == {"c1": 2, "c2": 2, "c10": 2}


def test_an_unreadable_validation_class_is_counted_and_named_never_scored_as_another_class(tmp_path, capsys):
    root = write_digit_folder(tmp_path / "data", train_per_class=2, val_per_class=2)
    for image in (root / "val" / "c10").iterdir():
        image.write_bytes(b"not a png")
    trainer = Trainer(folder_config(tmp_path, root))
    assert [label for _, label in trainer.data.val_set] == [0, 0, 1, 1, UNREADABLE, UNREADABLE]  # nothing substituted
    assert trainer.evaluate()["val_unreadable"] == 2
    trainer.save()
    capsys.readouterr()
    assert eval_main([str(tmp_path / "run" / "last.pth")]) == 0
    out = capsys.readouterr().out
    assert "2 validation images cannot be read and were not scored" in out and "c10/0.png: it cannot be decoded" in out
    assert eval_main([str(tmp_path / "run" / "last.pth"), "--set", "data.max_bad_images=1"]) == 2
    err = capsys.readouterr().err
    assert "error: 2 validation images cannot be read (named above), more than data.max_bad_images=1" in err


def test_decoding_on_the_device_marks_an_unreadable_validation_file_instead_of_replacing_it():
    image = io.BytesIO()
    Image.new("RGB", (20, 20), (90, 90, 90)).save(image, "PNG")
    files = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in (image.getvalue(), b"broken bytes")]
    decode = DeviceDecode(32, train=False, device=torch.device("cpu"))
    images, labels = next(iter(DecodedBatches([(files, torch.tensor([0, 1]))], decode, (0.5,) * 3, (0.5,) * 3)))
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, UNREADABLE]


def test_weights_without_a_class_list_are_labelled_by_the_training_split_when_val_lacks_a_class(tmp_path):
    import timm

    root = write_digit_folder(tmp_path / "data", train_per_class=1, val_per_class=2)
    shutil.rmtree(root / "val" / "c2")
    weights = tmp_path / "model_best.pth"
    torch.save(timm.create_model("sret_t", num_classes=3, img_size=32, **TINY_SRET).state_dict(), weights)
    kwargs = dict(TINY_SRET, img_size=32)
    scores = evaluate_checkpoint(str(weights), str(root), model="sret_t", model_kwargs=kwargs)  # not refused
    assert 0 <= scores["val_top1"] <= 100
    config = folder_config(tmp_path, root)
    assert [label for _, label in build_dataset(config, train=False).samples] == [0, 0, 2, 2]  # c10 keeps label 2
    shutil.rmtree(root / "train")
    with pytest.raises(CheckpointError, match=r"has 2 and no training split: which classes the labels skip cannot be "
                                              r"known. Put the train/ folder beside val/"):
        evaluate_checkpoint(str(weights), str(root), model="sret_t", model_kwargs=kwargs)


def test_a_checkpoint_of_the_old_plain_string_class_order_keeps_its_labels_in_eval_and_resume(tmp_path, capsys):
    root = write_digit_folder(tmp_path / "data", train_per_class=1, val_per_class=1)
    config = folder_config(tmp_path, root)
    Trainer(config).save()
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    state["classes"] = state["data"]["classes"] = ["c1", "c10", "c2"]  # as a version sorting plain strings wrote it
    del state["data"]["train_images"], state["data"]["val_images"]
    torch.save(state, tmp_path / "old.pth")
    assert eval_main([str(tmp_path / "old.pth")]) == 0
    assert "note: labels follow the class order stored in" in capsys.readouterr().out
    resumed = Trainer(config)
    resumed.resume(tmp_path / "old.pth")
    assert resumed.data.classes == ["c1", "c10", "c2"]
    assert [label for _, label in resumed.data.val_set.samples] == [0, 2, 1]  # c1, c2, c10 on disk


def test_an_empty_validation_split_is_refused_before_training(tmp_path, capsys):
    recipe = "recipes/quickstart.py"
    config = derive(load_recipe(recipe), data={"val_fraction": 0.0001})
    with pytest.raises(DataError, match=r"the validation split of digits holds no images \(data.val_fraction=0.0001 "
                                        r"of the 1797 digits rounds to none\): raise data.val_fraction"):
        Trainer(config)
    assert train_main([recipe, "--output-dir", str(tmp_path / "run"), "--set", "data.val_fraction=0.0001"]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "run").exists()
