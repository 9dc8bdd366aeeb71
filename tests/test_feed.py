"""How batches reach the device: uint8 images normalized there, per-sample draws, resident tensors."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import Mixup, create_transform

from train_helpers import tiny_config
from vitblocks.train import AugmentConfig, ConfigError, DataConfig, Trainer
from vitblocks.train.data.datasets import eval_transform
from vitblocks.train.data.decoders import DECODERS, torchcodec_available
from vitblocks.train.data.draws import seed_draws
from vitblocks.train.data.feed import ResidentBatches, default_workers, describe_feed
from vitblocks.train.data.image_folder import load_image
from vitblocks.train.run.builders import build_data

AUGMENT = dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("feed") / "data"
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for name in ("ant", "bee"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                size = (40 + 3 * i, 36 + 5 * i)  # different sizes: crops and resizes differ per image
                Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def folder_config(tmp_path, root, workers=0, **augment):
    data = DataConfig(dataset="imagefolder", root=str(root), img_size=32, num_classes=2, batch_size=4, workers=workers)
    return tiny_config(tmp_path / "run", epochs=1, data=data, augment=AugmentConfig(**dict(AUGMENT, **augment)))


def float_train_transform(config):
    """The path before images travelled as uint8: PIL -> crop/flip/RandAugment -> float, normalized in the worker."""
    data, aug = config.data, config.augment
    return create_transform(data.img_size, is_training=True, auto_augment=aug.auto_augment, hflip=aug.hflip,
                            scale=aug.scale, re_prob=0.0, interpolation=data.interpolation, mean=data.mean,
                            std=data.std)


def float_batch(config, samples, keys):
    transform = float_train_transform(config)
    images = []
    for (path, _), key in zip(samples, keys):
        seed_draws(key)
        images.append(transform(load_image(path)))
    return torch.stack(images)


def test_uint8_images_normalized_on_the_device_equal_the_float_path(tmp_path, folder):
    config = folder_config(tmp_path, folder)
    data = build_data(config)
    images, labels = next(iter(data.val_loader()))
    assert images.dtype == torch.float32 and labels.tolist() == [0] * 4
    expected = torch.stack([eval_transform(config.data)(load_image(path)) for path, _ in data.val_set.samples[:4]])
    torch.testing.assert_close(images, expected, atol=1e-6, rtol=0)

    sampler = data.train_sampler
    sampler.set_epoch(1)
    keys = list(sampler)
    before = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    train_batches = [images for images, _ in data.train_loader()]
    # loading in the main process leaves its generators where they were (mixup and dropout draw from them)
    assert torch.equal(before[0], torch.get_rng_state()) and np.array_equal(before[1], np.random.get_state()[1])
    assert before[2] == random.getstate()
    samples = [data.train_set.samples[index] for index, _ in keys[:4]]
    torch.testing.assert_close(train_batches[0], float_batch(config, samples, [key for _, key in keys[:4]]),
                               atol=1e-6, rtol=0)

    # the draws belong to a sample's place in the epoch: a worker resuming after the first batch sees the same images
    config.data.workers = 1
    resumed = build_data(config)
    resumed.train_sampler.set_epoch(1, skip=4)
    tail = [images for images, _ in resumed.train_loader()]
    assert len(tail) == len(train_batches) - 1
    for got, want in zip(tail, train_batches[1:]):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    resumed.close()


def test_random_erasing_runs_on_the_device_batch(tmp_path, folder):
    plain, erased = (folder_config(tmp_path, folder, re_prob=p) for p in (0.0, 1.0))
    batches = []
    for config in (plain, erased):
        data = build_data(config)
        data.train_sampler.set_epoch(0)
        batches.append(next(iter(data.train_loader()))[0])
    for clean, patched in zip(*batches):
        changed = (clean != patched).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        assert len(rows) and len(cols), "every image is erased at re_prob=1"
        box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert changed.sum() == box.sum() and box.float().mean() > 0.9  # one rectangle of new pixels


def test_the_models_inputs_are_timms_mixup_of_the_float_path_batch(tmp_path, folder):
    config = folder_config(tmp_path, folder, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    trainer = Trainer(config)
    seen = {}
    mixup = trainer.mixup

    def recording_mixup(images, targets):
        seen["rng"] = np.random.get_state(), random.getstate()
        seen["out"] = mixup(images, targets)
        return seen["out"]

    trainer.mixup = recording_mixup
    trainer.steps_per_epoch = 1
    trainer.train_epoch(progress=False)
    sampler = trainer.data.train_sampler
    sampler.set_epoch(0)
    keys = list(sampler)[:4]
    images = float_batch(config, [trainer.data.train_set.samples[i] for i, _ in keys], [k for _, k in keys])
    labels = torch.tensor([trainer.data.train_set.samples[i][1] for i, _ in keys])
    np.random.set_state(seen["rng"][0])
    random.setstate(seen["rng"][1])
    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=2)
    expected_images, expected_targets = timm_mixup(images, labels)
    torch.testing.assert_close(seen["out"][0], expected_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen["out"][1], expected_targets)


def test_tensors_in_memory_stay_on_the_device_and_follow_the_sampler(tmp_path):
    config = tiny_config(tmp_path)
    data = build_data(config)
    loader = data.train_loader()
    assert isinstance(loader, ResidentBatches) and len(loader) == 6
    data.train_sampler.set_epoch(3, skip=16)
    order = list(data.train_sampler)
    batches = list(loader)
    assert len(batches) == 4
    images, labels = data.train_set.tensors
    torch.testing.assert_close(batches[0][0], images[order[:8]])
    assert batches[-1][1].tolist() == labels[order[24:32]].tolist()


def test_default_workers_share_the_nodes_cpus():
    assert default_workers(1, cpus=2) == 1 and default_workers(1, cpus=64) == 16
    assert default_workers(8, cpus=128) == 15 and default_workers(8, cpus=8) == 1


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """JPEG photos-to-be of two classes, with one PNG and one file that is not a decodable JPEG in train/."""
    root = tmp_path_factory.mktemp("jpegs") / "data"
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 4)):
        for shade, name in ((60, "ant"), (180, "bee")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                small = (rng.random((6, 8, 3)) * 80 + shade - 40).astype(np.uint8)
                image = Image.fromarray(small).resize((48 + 4 * i, 40 + 2 * i), Image.BICUBIC)
                image.save(root / split / name / f"{i}.jpg", quality=95)
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(root / "train" / "ant" / "extra.png")
    (root / "train" / "bee" / "broken.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 4)
    return root


def decode_config(tmp_path, root, decode):
    config = folder_config(tmp_path, root, auto_augment=None, color_jitter=0.0, re_prob=0.25)
    config.data.decode = decode
    return config


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoding_on_the_device_matches_the_cpu_path_and_replaces_broken_files(tmp_path, jpegs, caplog, decoder,
                                                                               monkeypatch):
    if decoder == "torchcodec" and not torchcodec_available():
        pytest.skip("torchcodec is not installed here")  # the dev extra installs it: CI runs both
    monkeypatch.setenv("VITBLOCKS_DECODER", decoder)
    cpu, gpu = decode_config(tmp_path, jpegs, "cpu"), decode_config(tmp_path, jpegs, "gpu")
    (cpu_images, cpu_labels), (gpu_images, gpu_labels) = (next(iter(build_data(c).val_loader())) for c in (cpu, gpu))
    assert gpu_images.shape == cpu_images.shape == (4, 3, 32, 32) and torch.equal(gpu_labels, cpu_labels)
    std = torch.tensor(cpu.data.std).view(1, 3, 1, 1) * 255  # in pixel steps: decoders and resamplers differ a little
    assert ((gpu_images - cpu_images) * std).abs().mean() < 2.0

    data = build_data(gpu)
    loader = data.train_loader()
    assert (f"decoded by {decoder} (JPEG: nvJPEG on CUDA), cropped, normalized, randomly erased on cpu"
            in describe_feed(loader, 0))
    data.train_sampler.set_epoch(0)
    torch.manual_seed(5), random.seed(5)
    first = [images for images, _ in loader]  # 13 files, one broken: replaced by another image of its batch
    torch.manual_seed(5), random.seed(5)
    assert all(torch.equal(a, b) for a, b in zip(first, [images for images, _ in loader]))  # crops follow the seed
    assert len(first) == 3 and all(images.shape == (4, 3, 32, 32) for images in first)
    assert "skipped an image that cannot be decoded" in caplog.text

    if decoder == "torchvision":  # training through the feed once is enough
        Trainer(gpu).fit(progress=False)
    with pytest.raises(ConfigError, match=r"data.decode='gpu' .* no RandAugment or color jitter"):
        decode_config(tmp_path, jpegs, "gpu").__class__(**{**vars(gpu), "augment": AugmentConfig()})


def test_randaugment_posterize_keeping_no_bits_gives_black_instead_of_stopping_the_run(tmp_path):
    from PIL import ImageOps

    from vitblocks.train.data.datasets import train_transform

    transform = train_transform(tiny_config(tmp_path, augment=AugmentConfig()))  # DeiT's rand-m9-mstd0.5-inc1
    posterize = [op for step in transform.transforms for op in getattr(step, "ops", []) if "Posterize" in op.name]
    assert posterize, "the DeiT policy has a posterize operation"
    image = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    level = posterize[0].level_fn(10.0, posterize[0].hparams)[0]  # the top of the magnitude range
    assert level == 0 and not np.asarray(posterize[0].aug_fn(image, level)).any()
    assert posterize[0].aug_fn(image, 3).tobytes() == ImageOps.posterize(image, 3).tobytes()
