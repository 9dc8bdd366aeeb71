"""The training configuration's schema: one typed dataclass per section, fields with their rules.

A recipe is a Python file that assigns a `TrainConfig` to the name `config`:

    from vitblocks.train import TrainConfig, DataConfig
    config = TrainConfig(model=ModelConfig("sret_t"), data=DataConfig(root="/data/imagenet"))

Each field declares what it allows (`choice`, `bounded`, `at_least_one` in
`vitblocks.train.config.fields`); a config is checked when it is made
(`vitblocks.train.config.checks.validate`). Recipes are loaded, derived and overridden
in `vitblocks.train.config.recipe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitblocks.attention import backend_names
from vitblocks.layers.modes import CHECKPOINT_SETTINGS
from vitblocks.train.config.checks import validate
from vitblocks.train.config.fields import at_least_one, bounded, choice
from vitblocks.train.config.names import COMPILE_MODES
from vitblocks.train.errors import ConfigError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
"""`data.interpolation` values: the resize filters timm's transforms take."""


def _probability(value: float) -> bool:
    return 0 <= value <= 1


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


__all__ = ["AugmentConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DistillConfig", "LoggingConfig",
           "ModelConfig", "OptimConfig", "ScheduleConfig", "TrainConfig"]


@dataclass
class ModelConfig:
    """Which model to train.

    Attributes:
        name: A timm model name (vitblocks models are registered on import).
        kwargs: Extra `timm.create_model` arguments, e.g. `{"drop_path_rate": 0.1}`.
        grad_checkpointing: Activation checkpointing: False, True ("loop"), or "sqrt"
            for vitblocks recursive models.
        backend: Attention backend of vitblocks layers: auto, sdpa, xformers, math, or
            any registered backend.
        compile: "none" (or False): eager; "model" (or True): `torch.compile(model)`;
            "regional": each shared block compiled once (`vitblocks.compile_regions`),
            whose compile time does not grow with the loop count; "graphs" (CUDA):
            `torch.compile(mode="reduce-overhead")`, forward and backward replayed as
            CUDA graphs; "auto": the device's default (see
            `vitblocks.train.run.compile_modes.CUDA_DEFAULT`).
        convert: Turn the (unshared) model into a weight-shared one before training
            (`vitblocks.models.convert_to_recursive`); empty: train `name` as it is.
            Keys: `base_checkpoint` (the trained base weights: a trainer checkpoint,
            state dict or .safetensors file; None converts the weights the model is
            built with, e.g. timm's `pretrained=True`) and the options of `convert_to_recursive`
            (`loops`, `share`, `init`, `rank`, `targets`, `norms`, `biases`,
            `layer_scale`), e.g.
            `{"base_checkpoint": "runs/base/best.pth", "share": "cycle", "rank": 8}`.
        static_graph: Under torchrun, tell DDP that every step uses the same parameters
            in the same order (`DistributedDataParallel(static_graph=True)`), true of
            every vitblocks and timm model here; False for a model whose forward skips
            parameters on some steps. None: on unless gradients accumulate
            (`optim.accum_steps` > 1), since torch's reducer fails on a static graph
            whose first backward runs under `no_sync`.
    """

    name: str = "sret_t"
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool | str = choice(False, CHECKPOINT_SETTINGS)
    backend: str = choice("auto", backend_names)  # read when checked: backends registered later count
    compile: bool | str = choice(False, (False, True, *COMPILE_MODES, "auto"))
    convert: dict[str, Any] = field(default_factory=dict)
    static_graph: bool | None = choice(None, (None, False, True))


@dataclass
class DataConfig:
    """Where images come from and how they are batched.

    Attributes:
        dataset: "imagefolder" (`root/train/<class>/*`, `root/val/<class>/*`), "digits"
            (scikit-learn's bundled 8x8 digits, upsampled), "synthetic" (random
            images, for smoke tests), or a dataset of timm's `create_dataset` by its
            name: "wds/NAME" (webdataset tar shards in `root`), "hfds/NAME",
            "hfids/NAME", "tfds/NAME", "torch/NAME" (`vitblocks.train.data.timm_datasets`).
        root: Folder of an imagefolder dataset, of webdataset shards and their
            `_info.json`, or timm's cache folder for the other timm datasets.
        train_split: The training split of a timm dataset (a name of its `_info.json`,
            or a shard pattern with its sample count, "train-{0000..0099}.tar|128000").
        val_split: Its validation split.
        img_size: Training and evaluation resolution.
        num_classes: Classifier outputs.
        batch_size: Images per step per process.
        workers: Loader worker processes per training process, kept alive across
            epochs; None: the node's CPUs shared by its processes, one CPU kept for each
            (`vitblocks.train.data.feed.default_workers`). Tensors in memory (digits,
            synthetic) live on the device and need none.
        val_fraction: Share of the digits held out for validation.
        synthetic_samples: Training images of the synthetic dataset.
        crop_pct: Evaluation center-crop fraction (0.875: resize 256, crop 224).
        interpolation: Resize interpolation.
        mean: Normalization mean.
        std: Normalization standard deviation.
        max_bad_images: ImageFolder files that cannot be decoded which each loading
            process skips (naming them) before the run stops.
        decode: Where an ImageFolder's images are decoded and cropped: "cpu" (PIL in
            the loader's workers, with any timm augmentation) or "gpu" (the workers read
            bytes; JPEGs are decoded by nvJPEG and cropped and flipped on the training
            device, `vitblocks.train.data.device_decode`; no RandAugment or color jitter).
    """

    dataset: str = "imagefolder"
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "validation"
    img_size: int = at_least_one(224)
    num_classes: int = at_least_one(1000)
    batch_size: int = at_least_one(128)
    workers: int | None = bounded(None, lambda v: v >= 0, "must be >= 0 (0 loads data in the main process)")
    val_fraction: float = bounded(
        0.2, lambda v: 0 < v < 1,
        "must be between 0 and 1 (exclusive): the share of the digits held out for validation")
    synthetic_samples: int = at_least_one(64)
    crop_pct: float = bounded(0.875, lambda v: 0 < v <= 1, "must be in (0, 1]")
    interpolation: str = choice("bicubic", INTERPOLATIONS)
    mean: tuple[float, ...] = bounded(IMAGENET_DEFAULT_MEAN, lambda v: all(_finite(m) for m in v),
                                      "must be finite numbers, one per channel")
    std: tuple[float, ...] = bounded(IMAGENET_DEFAULT_STD, lambda v: all(_finite(s) and s > 0 for s in v),
                                     "must be numbers > 0, one per channel (images are divided by them)")
    max_bad_images: int = bounded(
        100, lambda v: v >= 0, "must be >= 0 (0 stops at the first image that cannot be decoded)")
    decode: str = choice("cpu", ("cpu", "gpu"))


@dataclass
class AugmentConfig:
    """Training-time augmentation (imagefolder data; mixup and smoothing apply to all).

    Attributes:
        auto_augment: timm auto-augment policy, e.g. "rand-m9-mstd0.5-inc1"; None: off.
        color_jitter: Color jitter strength when no auto-augment policy is set.
        hflip: Horizontal flip probability.
        scale: Random-resized-crop area range.
        re_prob: Random erasing probability.
        mixup: Mixup alpha (0: off).
        cutmix: CutMix alpha (0: off).
        mixup_prob: Probability of applying mixup or cutmix to a batch.
        mixup_switch_prob: Probability of cutmix instead of mixup when both are on.
        label_smoothing: Label smoothing.
        repeated_aug: Repeat each image 3 times per epoch under different augmentation
            (DeiT's repeated augmentation).
    """

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = bounded(0.4, lambda v: v >= 0, "must be >= 0 (0 turns color jitter off)")
    hflip: float = bounded(0.5, _probability, "must be a probability in [0, 1]")
    scale: tuple[float, float] = bounded(
        (0.08, 1.0), lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
        "must be (smallest, largest) crop area fractions with 0 < smallest <= largest <= 1")
    re_prob: float = bounded(0.25, _probability, "must be a probability in [0, 1]")
    mixup: float = bounded(0.8, lambda v: v >= 0, "must be >= 0 (0 turns mixup off)")
    cutmix: float = bounded(1.0, lambda v: v >= 0, "must be >= 0 (0 turns CutMix off)")
    mixup_prob: float = bounded(1.0, _probability, "must be a probability in [0, 1]")
    mixup_switch_prob: float = bounded(0.5, _probability, "must be a probability in [0, 1]")
    label_smoothing: float = bounded(0.1, lambda v: 0 <= v < 1, "must be in [0, 1)")
    repeated_aug: bool = choice(False, (False, True))


@dataclass
class OptimConfig:
    """Optimizer (built with `timm.optim.create_optimizer_v2`).

    Attributes:
        opt: Optimizer name.
        lr: Peak learning rate; None: `lr_per_512 * global_batch / 512`.
        lr_per_512: Learning rate per 512 images of global batch when `lr` is None.
        weight_decay: Decoupled weight decay (not applied to 1-D parameters, biases and
            the parameters a model lists in `no_weight_decay`).
        clip_grad: Clip the gradient norm to this value; None: off.
        accum_steps: Batches accumulated per optimizer step.
        fused: PyTorch's fused kernel for "adam" / "adamw" (one update for all
            parameters, with no host synchronisation: the multi-tensor version reads
            each parameter's step count on the host). None: fused for those two.
    """

    opt: str = "adamw"
    lr: float | None = bounded(None, lambda v: v > 0, "must be > 0 (or None to scale optim.lr_per_512 with the batch)")
    lr_per_512: float = bounded(1e-3, lambda v: v > 0, "must be > 0")
    weight_decay: float = bounded(0.05, lambda v: v >= 0, "must be >= 0")
    clip_grad: float | None = bounded(
        None, lambda v: v > 0, "must be > 0: the largest gradient norm kept (or None for no clipping)")
    accum_steps: int = at_least_one(1)
    fused: bool | None = choice(None, (None, False, True))


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (timm's `create_scheduler_v2`, updated every step).

    Attributes:
        sched: Schedule name ("cosine", "step", ...).
        warmup_epochs: Linear warmup length.
        warmup_lr: Learning rate at the start of warmup.
        min_lr: Final learning rate.
    """

    sched: str = "cosine"
    warmup_epochs: int = bounded(5, lambda v: v >= 0, "must be >= 0")
    warmup_lr: float = bounded(1e-6, lambda v: v >= 0, "must be >= 0 (a learning rate)")
    min_lr: float = bounded(1e-5, lambda v: v >= 0, "must be >= 0 (a learning rate)")


@dataclass
class DistillConfig:
    """Knowledge distillation from a teacher.

    Attributes:
        kind: "none"; "soft" (SReT: loss = batch mean of -sum softmax(t/T) *
            log_softmax(s/T), soft labels only); or "hard" (DeiT: mean of the usual
            loss and cross-entropy with the teacher's top class).
        teacher: timm model name of the teacher.
        teacher_checkpoint: Local weights for the teacher (state dict file).
        teacher_kwargs: Extra `timm.create_model` arguments for the teacher.
        temperature: Softmax temperature T of "soft".
        alpha: Weight of the teacher term in "hard".
    """

    kind: str = choice("none", ("none", "soft", "hard"))
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = bounded(1.0, lambda v: v > 0, "must be > 0 (logits are divided by it)")
    alpha: float = bounded(0.5, _probability, "must be in [0, 1]: the teacher term's share of the loss")


@dataclass
class CheckpointConfig:
    """When checkpoints are written (always `last.pth`, and `best.pth` on a new best).

    Attributes:
        every_steps: Also write `last.pth` every this many optimizer steps (0: only at
            the end of each epoch).
    """

    every_steps: int = bounded(0, lambda v: v >= 0, "must be >= 0 (0: checkpoints at the end of each epoch only)")


@dataclass
class LoggingConfig:
    """Experiment tracking besides the console and `metrics.csv` (`vitblocks.train.run.tracking`).

    Attributes:
        tensorboard: Write TensorBoard event files to `OUTPUT_DIR/tensorboard`.
        wandb: Log to Weights & Biases with these `wandb.init` arguments (e.g.
            `{"project": "sret", "entity": "me"}`); None: off. `WANDB_MODE=offline`
            logs without a network.
    """

    tensorboard: bool = choice(False, (False, True))
    wandb: dict[str, Any] | None = None


@dataclass
class TrainConfig:
    """One experiment: model, data, optimization and where results go.

    Attributes:
        model: See `ModelConfig`.
        data: See `DataConfig`.
        augment: See `AugmentConfig`.
        optim: See `OptimConfig`.
        schedule: See `ScheduleConfig`.
        distill: See `DistillConfig`.
        checkpoint: See `CheckpointConfig`.
        logging: See `LoggingConfig`.
        epochs: Training epochs.
        precision: "fp32", "bf16" (autocast on CUDA or CPU) or "fp16" (CUDA, with
            gradient scaling).
        ema_decay: Keep an exponential moving average of the weights; None: off.
        output_dir: Where checkpoints, metrics and plots go.
        seed: Random seed.
        log_every: Optimizer steps between reads of the loss from the device (progress bar,
            divergence check); the steps in between never wait for the device.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    epochs: int = at_least_one(300)
    precision: str = choice("fp32", ("fp32", "bf16", "fp16"))
    ema_decay: float | None = bounded(None, lambda v: 0 < v < 1, "must be in (0, 1), e.g. 0.9998 (or None for no EMA)")
    output_dir: str = "runs/experiment"
    seed: int = bounded(
        0, lambda v: 0 <= v < 2**31, "must be in [0, 2**31): NumPy takes seeds (plus the process rank) below 2**32")
    log_every: int = at_least_one(10)

    def __post_init__(self) -> None:
        validate(self)  # vitblocks.train.config.checks: each field's rules, then the rules across fields
