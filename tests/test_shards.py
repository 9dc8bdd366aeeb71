"""Training from webdataset tar shards through timm's `create_dataset`, and resuming mid-epoch."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from train_helpers import tiny_config
from vitblocks.train import Callback, ConfigError, DataConfig, Trainer
from vitblocks.train.errors import DataError

pytestmark = pytest.mark.slow  # trains or starts processes: left out of the quick subset

wds = pytest.importorskip("webdataset", reason="the shards extra: pip install -e '.[shards]'")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The digits as webdataset shards: 2 of training images, 1 of validation, and timm's _info.json."""
    from sklearn.datasets import load_digits

    digits, root = load_digits(), tmp_path_factory.mktemp("shards")
    splits = {"train": [range(0, 64, 2), range(1, 64, 2)], "validation": [range(64, 96)]}
    info = {"name": "digits", "splits": {}}
    for split, parts in splits.items():
        names = []
        for number, indices in enumerate(parts):
            names.append(f"digits-{split}-{number:06d}.tar")
            with wds.TarWriter(str(root / names[-1])) as shard:
                for i in indices:
                    png = io.BytesIO()
                    image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((16, 16))
                    image.convert("RGB").save(png, "PNG")
                    shard.write({"__key__": f"{i:06d}", "png": png.getvalue(), "cls": str(digits.target[i]).encode()})
        info["splits"][split] = {"name": split, "num_samples": sum(map(len, parts)), "filenames": names,
                                 "shard_lengths": [len(p) for p in parts]}
    (root / "_info.json").write_text(json.dumps(info))
    return root


def shard_config(output_dir, root, **data):
    options = dict(dataset="wds/digits", root=str(root), img_size=32, num_classes=10, batch_size=8, workers=1)
    return tiny_config(output_dir, epochs=2, data=DataConfig(**dict(options, **data)))


class StopAt(Callback):
    """Write last.pth after an optimizer step and stop, as a preempted job would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            trainer.save()
            raise InterruptedError


def test_shards_train_and_resume_mid_epoch_exactly(tmp_path, shards):
    reference = Trainer(shard_config(tmp_path / "reference", shards))
    assert len(reference.data.train_set) == 64 and reference.steps_per_epoch == 8
    reference.fit(progress=False)
    assert [row["epoch"] for row in reference.history] == [1, 2]
    stopped = Trainer(shard_config(tmp_path / "stopped", shards))
    stopped.callbacks.append(StopAt(11))  # epoch 2, batch 3
    with pytest.raises(InterruptedError):
        stopped.fit(progress=False)
    resumed = Trainer(shard_config(tmp_path / "stopped", shards))
    resumed.resume(tmp_path / "stopped" / "last.pth")
    assert (resumed.state.epoch, resumed.state.batch) == (1, 3)
    resumed.fit(progress=False)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert resumed.history[-1]["val_top1"] == reference.history[-1]["val_top1"]


def test_shard_datasets_refuse_what_they_cannot_do(tmp_path, shards):
    with pytest.raises(DataError, match=r"has no _info.json naming the shards"):
        Trainer(shard_config(tmp_path / "run", tmp_path))
    with pytest.raises(DataError, match=r"split 'nope' in .* could not be opened: split nope not found"):
        Trainer(shard_config(tmp_path / "run", shards, train_split="nope"))
    config = shard_config(tmp_path / "run", shards)
    config.augment.repeated_aug = True
    with pytest.raises(ConfigError, match=r"repeated_aug=True needs random access .* wds/digits is read as a stream"):
        Trainer(config)
    with pytest.raises(ConfigError, match=r"data.dataset='wds' is not one of .* nor a timm dataset name"):
        DataConfig(dataset="wds") and tiny_config(tmp_path, data=DataConfig(dataset="wds"))


def test_a_label_outside_the_class_count_stops_before_training_naming_split_and_fix(tmp_path, shards):
    trainer = Trainer(shard_config(tmp_path / "run", shards, num_classes=5))  # the shards hold digits 0-9
    with pytest.raises(DataError) as stopped:
        trainer.fit(progress=False)
    message = str(stopped.value).splitlines()[-1]  # re-raised from a loader worker: its message is the last line
    assert "data.dataset='wds/digits' split 'validation' holds the label" in message
    assert "outside [0, 5) for data.num_classes=5: set data.num_classes to the dataset's class count" in message
    assert trainer.state.step == 0  # the validation stream was read before the first step
