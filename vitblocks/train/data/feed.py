"""Batches on the training device, ready for the model.

How a split's batches are made is decided once from the config (`feed_for` gives a
`Feed`; `vitblocks.train.data.run_data.Data` holds one per split). The ways a batch reaches the
device, chosen by what the dataset gives per sample (`vitblocks.train.data.datasets.sample_form`):

- **Decoded image files** (`ImageFiles` built with `uint8=True`): worker processes decode
  and crop, and send uint8 images (a quarter of float32's bytes) into pinned memory;
  timm's `PrefetchLoader` copies the next batch on a side stream while the current one
  trains and normalizes it on the device, where each batch is randomly erased as it is
  handed out (`ErasedOnHandOut`: the draws stay in step order, so resuming is exact).
- **File bytes decoded on the device** (`data.decode="gpu"`): workers only read the files;
  `vitblocks.train.data.device_decode` decodes and crops each batch on the device.
- **Tensors in memory** (`TensorDataset`: the digits, synthetic images): they live on the
  device for the whole run and a batch is one `index_select` there; no worker, no copy.
- **Streams** (iterable datasets: webdataset shards and the other streamed timm datasets,
  `vitblocks.train.data.timm_datasets`): uint8 batches as for image files, from a stream
  restarted each epoch with seeds drawn from (seed, epoch), so that a resumed epoch can
  replay it and drop what was already trained on.
- **Any other dataset**: a plain `DataLoader`, its batches copied as they come (they are
  taken to be model-ready, e.g. already normalized floats).

Worker processes ignore the stop signals sent to the whole job (SLURM's SIGTERM, a closed
terminal's SIGHUP, Ctrl-C): the training process stops them after its checkpoint
(`vitblocks.train.process.preemption`). Each returned loader tells whether it has workers
(`has_workers`).

Mixup and CutMix run on the device in the trainer, on the batches these loaders give.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from timm.data.loader import PrefetchLoader, fast_collate
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.data.datasets import ResumableSampler, sample_form
from vitblocks.train.data.decoders import image_decoder
from vitblocks.train.data.device_decode import DecodedBatches, DeviceDecode, collate_encoded
from vitblocks.train.data.draws import SeededDraws
from vitblocks.train.data.timm_datasets import is_stream
from vitblocks.train.process.preemption import ignore_stop_signals

MAX_DEFAULT_WORKERS = 16
"""The most loader workers `data.workers=None` picks per process."""


def default_workers(processes_per_node: int = 1, cpus: int | None = None) -> int:
    """Loader workers per training process when `data.workers` is None.

    The node's CPUs are shared by its training processes, and each process keeps one CPU
    for itself (it launches the device's work and runs the loop): `cpus / processes - 1`,
    at least 1 and at most `MAX_DEFAULT_WORKERS`.

    Args:
        processes_per_node: Training processes on this machine (torchrun's
            `LOCAL_WORLD_SIZE`).
        cpus: CPUs this process may use (default: its affinity mask).

    Returns:
        The worker count.

    Examples:
        >>> default_workers(8, cpus=96), default_workers(1, cpus=2)
        (11, 1)
    """
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, min(MAX_DEFAULT_WORKERS, cpus // max(processes_per_node, 1) - 1))


def worker_count(workers: int | None) -> int:
    """`data.workers`, with None resolved by `default_workers` for this node's processes.

    Args:
        workers: The config value.

    Returns:
        Worker processes per training process.
    """
    if workers is not None:
        return workers
    return default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def describe_feed(loader: object, workers: int | None) -> str:
    """How a loader brings batches to the device, for the run header.

    Args:
        loader: What `make_loader` returned.
        workers: The config's `data.workers`.

    Returns:
        E.g. "uint8 from 3 workers (data.workers=None: auto), normalized on cuda:0".
    """
    if isinstance(loader, ResidentBatches):
        return f"held on {loader.device} (no loader workers)"
    count = f"{worker_count(workers)} workers" + (" (data.workers=None: auto)" if workers is None else "")
    if isinstance(loader, DecodedBatches):
        erased = ", randomly erased" if loader.random_erasing is not None else ""
        return (f"file bytes from {count}, decoded by {image_decoder().name} (JPEG: nvJPEG on CUDA), cropped, "
                f"normalized{erased} on "
                f"{loader.device} (data.decode='gpu')")
    if isinstance(loader, StreamBatches):
        count = f"{loader.workers} workers" + (" (data.workers=None: auto)" if workers is None else "")
        erased = " and randomly erased" if loader.random_erasing is not None else ""
        return f"a stream of uint8 from {count}, normalized{erased} on {loader.device}"
    if isinstance(loader, ErasedOnHandOut):
        return f"uint8 from {count}, normalized and randomly erased on {loader.device}"
    if isinstance(loader, PrefetchLoader):
        return f"uint8 from {count}, normalized on {loader.device}"
    return f"from {count}, copied to {getattr(loader, 'device', 'the device')}"


class ResidentBatches:
    """Batches of tensors kept on the device, in a sampler's order.

    Args:
        dataset: Images and labels (moved to `device` once, if not there already).
        sampler: Index order (with the epoch set before each pass).
        batch_size: Samples per batch.
        drop_last: Drop a last partial batch (training).
        device: Where the tensors live.
    """

    has_workers = False

    def __init__(self, dataset: TensorDataset, sampler: ResumableSampler, batch_size: int, drop_last: bool,
                 device: torch.device) -> None:
        self.tensors = [tensor.to(device) for tensor in dataset.tensors]
        dataset.tensors = tuple(self.tensors)  # one copy on the device, shared with the dataset
        self.sampler, self.batch_size, self.drop_last, self.device = sampler, batch_size, drop_last, device

    def __len__(self) -> int:
        return batch_count(len(self.sampler), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        indices = torch.tensor([item[0] if isinstance(item, tuple) else item for item in self.sampler],
                               dtype=torch.long).to(self.device)
        for start in range(0, batch_count(len(indices), self.batch_size, self.drop_last) * self.batch_size,
                           self.batch_size):
            chosen = indices[start : start + self.batch_size]
            yield [tensor.index_select(0, chosen) for tensor in self.tensors]


def batch_count(samples: int, batch_size: int, drop_last: bool) -> int:
    """Batches of `batch_size` in `samples`, a last partial one counted unless dropped.

    Args:
        samples: Samples in the pass.
        batch_size: Samples per batch.
        drop_last: Drop a last partial batch.

    Returns:
        The count.

    Examples:
        >>> batch_count(10, 4, drop_last=True), batch_count(10, 4, drop_last=False)
        (2, 3)
    """
    full, rest = divmod(samples, batch_size)
    return full + (rest > 0 and not drop_last)


@dataclass(frozen=True)
class Feed:
    """How one split's samples become batches on the device, decided once from the config (`feed_for`).

    Attributes:
        train: The training split: batches are augmented on the device and the last
            partial batch is dropped.
        batch_size: Samples per batch and process.
        workers: Loader worker processes (None: `default_workers`).
        seed: The run's seed (the workers' generators).
        normalize: (mean, std) in [0, 1] units for image samples, applied on the device;
            None for model-ready tensors.
        re_prob: Random-erasing probability, applied on the device.
        decode: `DeviceDecode`'s settings for files decoded on the device; None otherwise.
    """

    train: bool
    batch_size: int
    workers: int | None
    seed: int
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    re_prob: float = 0.0
    decode: dict[str, Any] | None = None

    def loader(self, dataset: Dataset, sampler: ResumableSampler, device: torch.device | str = "cpu") -> Iterable:
        """The split's batches on `device` (`make_loader`).

        Args:
            dataset: The split's dataset, built by the same config.
            sampler: Its sampler.
            device: Where batches go.

        Returns:
            The loader.
        """
        decode = DeviceDecode(train=self.train, device=torch.device(device), **self.decode) if self.decode else None
        return make_loader(dataset, sampler, self.batch_size, self.workers, self.train, self.seed, device,
                           normalize=self.normalize, re_prob=self.re_prob, decode=decode)


def feed_for(config: TrainConfig, train: bool) -> Feed:
    """How a config's training or validation batches reach the device.

    Args:
        config: The experiment.
        train: The training split (else validation).

    Returns:
        The feed.

    Examples:
        >>> from vitblocks.train import DataConfig, TrainConfig
        >>> feed_for(TrainConfig(data=DataConfig(dataset="synthetic")), train=True).normalize is None
        True
    """
    data, aug = config.data, config.augment
    form = sample_form(config)
    images = form != "tensors"
    decode = None
    if form == "bytes":
        decode = dict(img_size=data.img_size, scale=tuple(aug.scale), hflip=aug.hflip, crop_pct=data.crop_pct,
                      interpolation=data.interpolation, max_bad_images=data.max_bad_images)
    return Feed(train, data.batch_size, data.workers, config.seed,
                normalize=(tuple(data.mean), tuple(data.std)) if images else None,
                re_prob=aug.re_prob if train and images else 0.0, decode=decode)


def make_loader(dataset: Dataset, sampler: ResumableSampler, batch_size: int, workers: int | None, train: bool,
                seed: int, device: torch.device | str = "cpu",
                normalize: tuple[Sequence[float], Sequence[float]] | None = None,
                re_prob: float = 0.0, decode: DeviceDecode | None = None) -> Iterable:
    """Batches of a dataset on `device`, in the sampler's order (see the module's list of ways).

    Args:
        dataset: The dataset.
        sampler: Its sampler; the epoch is set before each pass, on a loader that lives
            for the whole run (its workers persist across epochs).
        batch_size: Samples per batch.
        workers: Worker processes (None: `default_workers`).
        train: Drop the last partial batch.
        seed: Base seed of the workers' own generators (augmentation draws are seeded per
            sample when the sampler yields keys).
        device: Where batches go.
        normalize: (mean, std) in [0, 1] units for uint8 images, applied on the device;
            None: batches are used as they come.
        re_prob: Random-erasing probability, applied on the device (uint8 images only).
        decode: For a dataset giving file bytes (`ImageFiles(read_bytes=True)`), the device
            decoder (`data.decode="gpu"`).

    Returns:
        An iterable of (images, labels) on `device`, with `len` in batches.
    """
    device = torch.device(device)
    if isinstance(dataset, TensorDataset):
        return ResidentBatches(dataset, sampler, batch_size, train, device)
    workers = worker_count(workers)
    if is_stream(dataset):
        prefetch = None
        if normalize is not None:
            prefetch = PrefetchLoader([], mean=tuple(normalize[0]), std=tuple(normalize[1]), device=device)
        return StreamBatches(dataset, sampler, batch_size, max(workers, 1), train, seed, device, prefetch, re_prob)
    loader = DataLoader(
        SeededDraws(dataset) if sampler.draws else dataset, batch_size=batch_size, sampler=sampler,
        num_workers=workers, drop_last=train, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        collate_fn=collate_encoded if decode is not None else fast_collate if normalize is not None else None,
        generator=torch.Generator().manual_seed(seed * 7919), worker_init_fn=ignore_stop_signals,
    )
    if decode is not None:
        batches: Iterable = DecodedBatches(loader, decode, *(normalize or ((0.0,) * 3, (1 / 255,) * 3)),
                                           re_prob=re_prob)
    elif normalize is None:
        batches = CopiedBatches(loader, device)
    else:
        mean, std = normalize
        batches = PrefetchLoader(loader, mean=tuple(mean), std=tuple(std), device=device)
        if re_prob > 0:
            batches = ErasedOnHandOut(batches, re_prob, device)
    batches.has_workers = workers > 0  # type: ignore[attr-defined]
    return batches


class ErasedOnHandOut:
    """Batches randomly erased (timm's `RandomErasing`, "pixel" mode) as each is handed to the training loop.

    timm's `PrefetchLoader` would erase a batch when it prefetches it, a step early: its
    draws then come between the previous step's in the process's random stream, and a run
    resumed from a checkpoint (which holds that stream) would draw them in another order.
    Erasing at hand-out keeps the stream in step order, so resuming stays exact.

    Args:
        loader: Batches of normalized images on the device.
        re_prob: Erasing probability per image.
        device: The batches' device.
    """

    def __init__(self, loader: Iterable, re_prob: float, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.random_erasing = RandomErasing(re_prob, mode="pixel", device=device)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield self.random_erasing(images), labels


class CopiedBatches:
    """A loader's batches copied to the device as they come.

    Args:
        loader: The loader.
        device: Where batches go.
    """

    def __init__(self, loader: Iterable, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for images, labels in self.loader:
            yield [images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)]


class StreamBatches:
    """Batches of an iterable dataset on the device, one stream per epoch, resumable by replay.

    Each epoch starts a new `DataLoader` whose generator is seeded by (seed, epoch), so its
    workers' seeds (sample shuffle, augmentation) are the same whenever that epoch runs;
    the dataset's `set_epoch` gives the shard order. After `sampler.set_epoch(epoch, skip)`
    the first `skip / processes / batch_size` batches are read and dropped before they
    reach the device.

    Args:
        dataset: The stream (timm's `IterableImageDataset` or any `IterableDataset`).
        sampler: Holds the epoch and the samples to skip (and the epoch's length).
        batch_size: Samples per batch.
        workers: Loader workers (at least 1).
        train: Drop the last partial batch.
        seed: The run's seed.
        device: Where batches go.
        prefetch: For uint8 images, timm's `PrefetchLoader` (normalizing on the device), its
            `loader` replaced each epoch (one copy stream for the run); None: batches are
            collated by torch's default and copied as they come.
        re_prob: Random-erasing probability of normalized images, applied as batches are
            handed out (`ErasedOnHandOut`).
    """

    def __init__(self, dataset: Iterable, sampler: ResumableSampler, batch_size: int, workers: int, train: bool,
                 seed: int, device: torch.device, prefetch: PrefetchLoader | None, re_prob: float = 0.0) -> None:
        self.dataset, self.sampler, self.batch_size, self.workers = dataset, sampler, batch_size, workers
        self.train, self.seed, self.device, self.prefetch = train, seed, device, prefetch
        self.handed_out = (ErasedOnHandOut(prefetch, re_prob, device) if prefetch is not None and re_prob > 0
                           else prefetch)
        self.random_erasing = getattr(self.handed_out, "random_erasing", None)
        if hasattr(dataset, "set_loader_cfg"):
            dataset.set_loader_cfg(num_workers=workers)

    def __len__(self) -> int:
        return batch_count(len(self.sampler), self.batch_size, self.train)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.sampler.epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers, drop_last=self.train,
                            collate_fn=fast_collate if self.prefetch is not None else None,
                            pin_memory=self.device.type == "cuda", worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        done = self.sampler.skip // self.sampler.world_size // self.batch_size
        remaining = itertools.islice(loader, done, None)
        if self.prefetch is None:
            return iter(CopiedBatches(remaining, self.device))
        self.prefetch.loader = remaining
        return iter(self.handed_out)
