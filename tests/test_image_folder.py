"""ImageFolder trees: what is counted is what is loaded, loops, nesting, 16-bit images, bad files."""

import logging
import os

import numpy as np
import pytest
from PIL import Image

from train_helpers import tiny_config
from vitblocks.train import Trainer
from vitblocks.train.config.schema import DataConfig
from vitblocks.train.data.datasets import build_dataset, dataset_classes
from vitblocks.train.data.image_folder import ImageFiles, load_image, scan_split
from vitblocks.train.errors import DataError


@pytest.fixture
def train_log(caplog):
    """The trainer's warnings; its logger does not propagate once a Trainer exists, so the
    capture handler is attached to it directly."""
    logger = logging.getLogger("vitblocks.train")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="vitblocks.train")
    yield caplog
    logger.removeHandler(caplog.handler)


def write_images(folder, count, suffix=".png", shade=100, size=20):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shade)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 40 + shade).astype(np.uint8)).save(folder / f"{i}{suffix}")


def folder_config(tmp_path, root, num_classes, **data):
    return tiny_config(tmp_path / "run", epochs=1, data=DataConfig(
        dataset="imagefolder", root=str(root), img_size=32, num_classes=num_classes, batch_size=4, workers=0, **data))


def test_every_counted_image_is_loaded_whatever_its_format_and_depth(tmp_path):
    root = tmp_path / "data"
    write_images(root / "train" / "bmp", 3, ".bmp", 40)
    write_images(root / "train" / "tif", 3, ".tif", 90)
    write_images(root / "train" / "webp", 2, ".WEBP", 140)
    write_images(root / "train" / "webp" / "more" / "deeper", 2, ".png", 150)  # nested: still class "webp"
    (root / "train" / "webp" / "notes.txt").write_text("not an image")
    write_images(root / "val" / "tif", 2, ".tif", 90)
    config = folder_config(tmp_path, root, 3)
    assert dataset_classes(config) == ["bmp", "tif", "webp"]
    train = build_dataset(config, train=True)
    assert len(train) == 10 and train.class_counts() == {"bmp": 3, "tif": 3, "webp": 4}
    assert sorted(label for _, label in train.samples) == [0] * 3 + [1] * 3 + [2] * 4
    image, label = train[9]
    assert tuple(image.shape) == (3, 32, 32) and label == 2


def test_a_link_loop_is_skipped_and_named(tmp_path, train_log):
    root = tmp_path / "data"
    for name, shade in (("c0", 50), ("c1", 150)):
        write_images(root / "train" / name, 12, shade=shade)
    os.symlink("..", root / "train" / "c0" / "loop")
    scan = scan_split(root / "train")
    assert len(scan.files) == 24 and scan.counts == {"c0": 12, "c1": 12}
    assert scan.loops == [str(root / "train" / "c0" / "loop")]
    build_dataset(folder_config(tmp_path, root, 2), train=True)
    assert "reached a second time through links" in train_log.text and "c0/loop" in train_log.text


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = np.asarray(load_image(str(tmp_path / "deep.png")))[..., 0].astype(int)
    expected = np.round(ramp / 257.0).astype(int)
    assert np.abs(pixels - expected).max() <= 1 and len(np.unique(pixels)) > 200


def test_an_empty_class_folder_is_named(tmp_path, train_log):
    root = tmp_path / "data"
    write_images(root / "train" / "ant", 2)
    write_images(root / "train" / "bee", 2)
    (root / "train" / "wasp").mkdir()
    with pytest.raises(DataError, match=r"has 2 classes \(ant, bee; not counted, as they hold no images: wasp\)"):
        dataset_classes(folder_config(tmp_path, root, 3))
    build_dataset(folder_config(tmp_path, root, 2), train=True)
    assert "class folders without images, not counted as classes: wasp" in train_log.text


def test_corrupt_images_are_named_and_skipped_up_to_a_limit(tmp_path, train_log, capsys):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name, shade in (("a", 40), ("b", 120), ("c", 200)):
            write_images(root / split / name, 8, shade=shade)
            (root / split / name / "0.png").write_bytes(b"not a png")  # the first image of every class
    trainer = Trainer(folder_config(tmp_path, root, 3))
    assert "3 images cannot be decoded and will be skipped" in train_log.text and "a/0.png" in train_log.text
    trainer.fit(progress=False)  # 21 of 24 images are fine: the run trains
    out = capsys.readouterr().out
    assert "24 train / 24 val images, 3 classes (train images per class: a 8, b 8, c 8)" in out
    strict = ImageFiles(root / "train", {"a": 0, "b": 1, "c": 2}, max_bad_images=1)
    assert strict[0][1] == 0 and strict[0][1] == 0  # the corrupt a/0.png is replaced by a/1.png, named once
    assert strict.bad == [str(root / "train" / "a" / "0.png")]
    with pytest.raises(DataError, match=r"2 images of .*train cannot be decoded, more than data.max_bad_images=1"):
        strict[8]


def test_an_unreadable_class_folder_is_a_clear_error(tmp_path, monkeypatch):
    root = tmp_path / "data"
    write_images(root / "train" / "a", 2)
    write_images(root / "train" / "b", 2)
    locked = str(root / "train" / "b")
    scandir = os.scandir

    def denied(path="."):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(DataError, match=f"cannot read the folder {locked}: Permission denied; fix its permissions"):
        dataset_classes(folder_config(tmp_path, root, 2))
