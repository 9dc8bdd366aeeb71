"""What it costs to feed the trainer, as ratios measured in this one process (CPU).

    python -m benchmarks.feed                    # writes docs/benchmarks/cpu/feed.md and feed.json
    python -m benchmarks.feed --quick            # a smaller run, to check the harness

Two comparisons:

1. **The loader's worker side, per image**: an ImageFolder of JPEGs (made here, 320x240
   like a typical photo) through a `DataLoader` with one worker, the main process doing
   nothing but receive, so wall time per image is the worker's cost. The float32 path is
   the one the trainer had before images travelled as uint8 (ToTensor, Normalize and
   RandomErasing in the worker, float32 batches through shared memory); the uint8 path
   stops after the crop (normalizing and erasing run on the device, timed apart as the
   main process's cost). Both with and without RandAugment; and the worker side of
   `data.decode="gpu"`, which only reads each file's bytes.
2. **The trainer's step against the bare step**: SReT-T at 64 px, batch 32, synthetic
   data, `Trainer.train_epoch` (mixup, label smoothing, the schedule, the callbacks, the
   loss read every `log_every` steps) against the timed step of `benchmarks.run` (zero
   grad, forward, loss, backward, fused AdamW), in turns.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader

import vitblocks  # noqa: F401 - registers the models
from benchmarks.run import _step_fn
from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig, Trainer
from vitblocks.train.data.datasets import with_safe_posterize
from vitblocks.train.data.device_decode import DeviceDecode, collate_encoded
from vitblocks.train.data.image_folder import ImageFiles, load_image, scan_split

ROOT = Path(__file__).resolve().parents[1]


def write_jpegs(root: Path, count: int, size: tuple[int, int] = (320, 240), classes: int = 1,
                split: str = "train") -> Path:
    """An ImageFolder split of smooth random JPEGs (photo-like file sizes), `count` per class."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(count):
            small = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return root / split


def make_jpeg_folder(root: Path, count: int) -> None:
    """A 10-class ImageFolder of 320x240 JPEGs for training runs: `count` train and count/8 val images."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / "parts" / str(part), count // 10 // 8, part) for part in range(8)]
    with ProcessPoolExecutor() as pool:  # one part per core, each with all classes
        list(pool.map(_write_part, jobs))
    for part_root, _, part in jobs:
        for split in ("train",):
            for folder in (part_root / split).iterdir():
                target = root / split / folder.name
                target.mkdir(parents=True, exist_ok=True)
                for file in folder.iterdir():
                    file.rename(target / f"{part}-{file.name}")
    shutil.rmtree(root / "parts")
    write_jpegs(root, max(count // 80, 2), classes=10, split="val")


def _write_part(job: tuple[Path, int, int]) -> None:
    write_jpegs(job[0], job[1], classes=10)


def loader_paths(split: Path, randaugment: bool) -> dict[str, DataLoader]:
    """The float32 and uint8 worker paths over one split."""
    policy = "rand-m9-mstd0.5-inc1" if randaugment else None
    common = dict(is_training=True, auto_augment=policy, interpolation="bicubic", mean=IMAGENET_DEFAULT_MEAN,
                  std=IMAGENET_DEFAULT_STD)
    float_transform = with_safe_posterize(create_transform(224, re_prob=0.25, re_mode="pixel", **common))
    float_set = ImageFiles(split, {"class0": 0}, float_transform)
    uint8_transform = with_safe_posterize(create_transform(224, use_prefetcher=True, **common))
    uint8_set = ImageFiles(split, {"class0": 0}, uint8_transform, uint8=True)
    bytes_set = ImageFiles(split, {"class0": 0}, read_bytes=True)
    options = dict(batch_size=32, num_workers=1, persistent_workers=True, shuffle=False)
    return {"float32": DataLoader(float_set, **options),
            "uint8": DataLoader(uint8_set, collate_fn=fast_collate, **options),
            "bytes": DataLoader(bytes_set, collate_fn=collate_encoded, **options)}


def seconds_per_image(loader: DataLoader, passes: int) -> float:
    """Fewest wall seconds per image over passes (the first pass starts the worker and is not timed).

    The minimum, not the median: on a shared machine the other tenants only ever add time.
    """
    for _ in loader:
        pass
    times = []
    for _ in range(passes):
        start, images = time.perf_counter(), 0
        for _, labels in loader:
            images += len(labels)
        times.append((time.perf_counter() - start) / images)
    return min(times)


def main_process_normalize_seconds(batch: torch.Tensor, repeats: int = 20) -> float:
    """Seconds per image of what the uint8 path moves to the device (here the CPU): normalize and erase."""
    feed = PrefetchLoader([(batch, torch.zeros(len(batch), dtype=torch.long))], device=torch.device("cpu"),
                          re_prob=0.25, re_mode="pixel")
    start = time.perf_counter()
    for _ in range(repeats):
        for _ in feed:
            pass
    return (time.perf_counter() - start) / repeats / len(batch)


def decode_seconds(split: Path, count: int = 64) -> float:
    """Seconds per image of decoding alone (PIL, as both worker paths do first)."""
    files = scan_split(split).files[:count]
    start = time.perf_counter()
    for path in files:
        load_image(path)
    return (time.perf_counter() - start) / len(files)


def device_decode_seconds(encoded, repeats: int = 3) -> float:
    """Seconds per image of `data.decode="gpu"`'s device side, run here on the CPU (decode, crop, flip)."""
    decode = DeviceDecode(224, True, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(repeats):
        decode(encoded)
    return (time.perf_counter() - start) / repeats / len(encoded.lengths)


def measure_loader(count: int, passes: int, rounds: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        split = write_jpegs(Path(workdir), count)
        scan_split(split)
        for randaugment in (False, True):
            loaders = loader_paths(split, randaugment)
            per_image = {}
            for _ in range(rounds):  # in turns, so drifting load affects both
                for name, loader in loaders.items():
                    per_image.setdefault(name, []).append(seconds_per_image(loader, passes))
            uint8_set, bytes_set = loaders["uint8"].dataset, loaders["bytes"].dataset
            uint8_batch = fast_collate([uint8_set[i] for i in range(32)])[0]
            encoded = collate_encoded([bytes_set[i] for i in range(32)])[0]
            for loader in loaders.values():  # persistent workers end before their folder is removed
                if loader._iterator is not None:
                    loader._iterator._shutdown_workers()
            fastest = {name: min(values) for name, values in per_image.items()}
            rows.append({
                "augmentation": "RandomResizedCrop + flip" + (" + RandAugment" if randaugment else ""),
                "float32_ms_per_image": 1e3 * fastest["float32"], "uint8_ms_per_image": 1e3 * fastest["uint8"],
                "ratio": fastest["uint8"] / fastest["float32"], "decode_ms_per_image": 1e3 * decode_seconds(split),
                "device_side_ms_per_image_on_cpu": 1e3 * main_process_normalize_seconds(uint8_batch),
            })
            if not randaugment:  # data.decode="gpu" has no RandAugment
                rows[-1].update(bytes_ms_per_image=1e3 * fastest["bytes"],
                                device_decode_ms_per_image_on_cpu=1e3 * device_decode_seconds(encoded))
            del loaders
    return rows


def trainer_config(output_dir: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig("sret_t", kwargs={"drop_path_rate": 0.0}),
        data=DataConfig(dataset="synthetic", img_size=64, num_classes=100, batch_size=32, workers=0,
                        synthetic_samples=32 * steps),
        augment=AugmentConfig(auto_augment=None, re_prob=0.0),
        optim=OptimConfig(lr=1e-4), schedule=ScheduleConfig(warmup_epochs=1), epochs=100, output_dir=str(output_dir))


def measure_step(steps: int, rounds: int) -> dict:
    """Images per second of the trainer's epoch and of the bare step, in turns."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        trainer = Trainer(trainer_config(Path(workdir), steps))
        bare_model = timm.create_model("sret_t", num_classes=100, img_size=64, drop_path_rate=0.0).train()
        images = torch.randn(32, 3, 64, 64)
        bare = _step_fn(bare_model, images, True, "fp32", fused=True)
        for _ in range(3):
            bare()
        trainer_rates, step_rates, bare_rates = [], [], []
        for round_ in range(rounds + 1):  # the first is a warm-up
            result = trainer.train_epoch(progress=False)
            state = trainer.state
            state.epoch, state.batch, state.epoch_samples = state.epoch + 1, 0, 0
            if not round_:
                continue
            trainer_rates.append(result["train_img_s"])
            step_rates.append(result["step_img_s"])
            start = time.perf_counter()
            for _ in range(steps):
                bare()
            bare_rates.append(32 * steps / (time.perf_counter() - start))
        trainer.data.close()
    trainer_rate, bare_rate = max(trainer_rates), max(bare_rates)  # the fastest round of each: others only add time
    return {"model": "sret_t", "img_size": 64, "batch": 32, "steps_per_round": steps, "rounds": rounds,
            "trainer_img_s": trainer_rate, "trainer_step_img_s": max(step_rates),
            "bare_step_img_s": bare_rate, "ratio": trainer_rate / bare_rate}


def markdown(loader_rows: list[dict], step: dict, environment: dict) -> str:
    lines = [f"Measured on {environment['cpu']} ({environment['threads']} threads), torch {environment['torch']}, "
             f"timm {environment['timm']}.", "",
             "**The loader's worker side** (one worker, 224 px crops of 320x240 JPEGs, batch 32; the fastest of "
             "the passes, made in turns):", "",
             "| augmentation | float32 path ms/image | uint8 path ms/image | uint8 / float32 | of which JPEG decoding "
             "ms/image | normalize + erase, on the device (here the CPU) ms/image |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in loader_rows:
        lines.append(f"| {row['augmentation']} | {row['float32_ms_per_image']:.2f} | {row['uint8_ms_per_image']:.2f} "
                     f"| {row['ratio']:.2f}x | {row['decode_ms_per_image']:.2f} | "
                     f"{row['device_side_ms_per_image_on_cpu']:.3f} |")
    decoded = [row for row in loader_rows if "bytes_ms_per_image" in row]
    if decoded:
        row = decoded[0]
        lines += ["", f"With `data.decode=\"gpu\"` (crop and flip only) a worker reads bytes: "
                  f"{row['bytes_ms_per_image']:.3f} ms per image "
                  f"({row['bytes_ms_per_image'] / row['float32_ms_per_image']:.3f}x "
                  f"of the float32 path); decoding, cropping and flipping then take "
                  f"{row['device_decode_ms_per_image_on_cpu']:.2f} ms per image in the main process when the device "
                  "is this CPU (on a GPU, nvJPEG does the decoding)."]
    lines += ["", f"**The trainer's step against the bare step** ({step['model']}, {step['img_size']} px, batch "
              f"{step['batch']}, synthetic data, {step['steps_per_round']} steps x {step['rounds']} rounds in turns, "
              "the fastest round of each):", "",
              "| trainer img/s (epoch) | trainer img/s (without loader wait) | bare step img/s | trainer / bare |",
              "|---:|---:|---:|---:|",
              f"| {step['trainer_img_s']:.1f} | {step['trainer_step_img_s']:.1f} | {step['bare_step_img_s']:.1f} | "
              f"{step['ratio']:.2f}x |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images, steps and rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu")
    parser.add_argument("--make-jpegs", type=Path, metavar="DIR",
                        help="only write a 10-class ImageFolder of JPEGs there (for training runs), then stop")
    parser.add_argument("--count", type=int, default=6144, help="training images of --make-jpegs")
    args = parser.parse_args(argv)
    if args.make_jpegs:
        make_jpeg_folder(args.make_jpegs, args.count)
        print(f"wrote {args.count} training JPEGs to {args.make_jpegs}/train and {args.make_jpegs}/val")
        return 0
    images, passes, steps, rounds = (64, 1, 4, 1) if args.quick else (256, 3, 12, 4)
    environment = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                   "torch": torch.__version__, "timm": timm.__version__, "python": sys.version.split()[0]}
    loader_rows = measure_loader(images, passes, rounds)
    step = measure_step(steps, rounds)
    text = markdown(loader_rows, step, environment)
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "feed.md").write_text(text)
        (args.out / "feed.json").write_text(json.dumps({"environment": environment, "loader": loader_rows,
                                                        "step": step}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
