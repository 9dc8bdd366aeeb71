"""Typed training configuration, recipe loading and command-line overrides.

A recipe is a Python file that assigns a `TrainConfig` to the name `config`::

    from vitblocks.train import TrainConfig, DataConfig
    config = TrainConfig(model=ModelConfig("sret_t"), data=DataConfig(root="/data/imagenet"))

A recipe derived from another changes typed fields with `derive`::

    config = derive(load_recipe(RECIPES / "sret_t_imagenet.py"), model={"name": "sret_s"}, epochs=100)

On the command line any field can be overridden by its dotted path:
`--set optim.lr=1e-3 epochs=5`. Model options (`model.kwargs`) are checked against the
model's constructor when the config is built.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import runpy
import traceback
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitblocks.attention import backend_names
from vitblocks.layers.modes import CHECKPOINT_SETTINGS
from vitblocks.layers.relaxation import relaxation_options
from vitblocks.train.compile_modes import COMPILE_MODES
from vitblocks.train.timm_datasets import TIMM_PREFIXES, is_timm_dataset


class ConfigError(ValueError):
    """A recipe or override that cannot be applied."""


@dataclass
class ModelConfig:
    """Which model to train.

    Attributes:
        name: A timm model name (vitblocks models are registered on import).
        kwargs: Extra `timm.create_model` arguments, e.g. `{"drop_path_rate": 0.1}`.
        grad_checkpointing: Activation checkpointing: False, True ("loop"), or "sqrt"
            for vitblocks recursive models.
        backend: Attention backend of vitblocks layers: auto, xformers, sdpa, math, or
            any registered backend.
        compile: "none" (or False): eager; "model" (or True): `torch.compile(model)`;
            "regional": each shared block compiled once (`vitblocks.compile_regions`),
            whose compile time does not grow with the loop count; "graphs" (CUDA):
            `torch.compile(mode="reduce-overhead")`, forward and backward replayed as
            CUDA graphs; "auto": the device's default (see
            `vitblocks.train.compile_modes.CUDA_DEFAULT`).
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
    grad_checkpointing: bool | str = False
    backend: str = "auto"
    compile: bool | str = False
    convert: dict[str, Any] = field(default_factory=dict)
    static_graph: bool | None = None


@dataclass
class DataConfig:
    """Where images come from and how they are batched.

    Attributes:
        dataset: "imagefolder" (`root/train/<class>/*`, `root/val/<class>/*`), "digits"
            (scikit-learn's bundled 8x8 digits, upsampled), "synthetic" (random
            images, for smoke tests), or a dataset of timm's `create_dataset` by its
            name: "wds/NAME" (webdataset tar shards in `root`), "hfds/NAME",
            "hfids/NAME", "tfds/NAME", "torch/NAME" (`vitblocks.train.timm_datasets`).
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
            (`vitblocks.train.feed.default_workers`). Tensors in memory (digits,
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
            device, `vitblocks.train.device_decode`; no RandAugment or color jitter).
    """

    dataset: str = "imagefolder"
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "validation"
    img_size: int = 224
    num_classes: int = 1000
    batch_size: int = 128
    workers: int | None = None
    val_fraction: float = 0.2
    synthetic_samples: int = 64
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    max_bad_images: int = 100
    decode: str = "cpu"


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
    color_jitter: float = 0.4
    hflip: float = 0.5
    scale: tuple[float, float] = (0.08, 1.0)
    re_prob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    repeated_aug: bool = False


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
    lr: float | None = None
    lr_per_512: float = 1e-3
    weight_decay: float = 0.05
    clip_grad: float | None = None
    accum_steps: int = 1
    fused: bool | None = None


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
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5


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

    kind: str = "none"
    teacher: str | None = None
    teacher_checkpoint: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0
    alpha: float = 0.5


@dataclass
class CheckpointConfig:
    """When checkpoints are written (always `last.pth`, and `best.pth` on a new best).

    Attributes:
        every_steps: Also write `last.pth` every this many optimizer steps (0: only at
            the end of each epoch).
    """

    every_steps: int = 0


@dataclass
class LoggingConfig:
    """Experiment tracking besides the console and `metrics.csv` (`vitblocks.train.tracking`).

    Attributes:
        tensorboard: Write TensorBoard event files to `OUTPUT_DIR/tensorboard`.
        wandb: Log to Weights & Biases with these `wandb.init` arguments (e.g.
            `{"project": "sret", "entity": "me"}`); None: off. `WANDB_MODE=offline`
            logs without a network.
    """

    tensorboard: bool = False
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
    epochs: int = 300
    precision: str = "fp32"
    ema_decay: float | None = None
    output_dir: str = "runs/experiment"
    seed: int = 0
    log_every: int = 10

    def __post_init__(self) -> None:
        validate(self)


_CHOICES: dict[str, typing.Callable[[], tuple[Any, ...]]] = {
    "precision": lambda: ("fp32", "bf16", "fp16"),
    "distill.kind": lambda: ("none", "soft", "hard"),
    "data.decode": lambda: ("cpu", "gpu"),
    "model.backend": backend_names,  # read when validating: backends registered later count
    "model.grad_checkpointing": lambda: CHECKPOINT_SETTINGS,
    "model.compile": lambda: (False, True, *COMPILE_MODES, "auto"),
}

DATASETS = ("imagefolder", "digits", "synthetic")
"""`data.dataset` values besides timm's dataset names."""

_RENAMED = {"model.attn_backend": "model.backend"}
"""Keys of configs stored in older checkpoints -> their current names."""
_POSITIVE = ("epochs", "data.img_size", "data.num_classes", "data.batch_size", "optim.accum_steps", "log_every")


def validate(config: TrainConfig) -> None:
    """Check values that types alone do not constrain.

    Args:
        config: The config to check.

    Raises:
        ConfigError: Naming the field, its value and what is allowed.
    """
    values = dict(iter_fields(config))
    for path, allowed in _CHOICES.items():
        choices = allowed()
        if values[path] not in choices:
            raise ConfigError(f"{path}={values[path]!r} is not one of {choices}")
    dataset = config.data.dataset
    if dataset not in DATASETS and not is_timm_dataset(dataset):
        raise ConfigError(f"data.dataset={dataset!r} is not one of {DATASETS} nor a timm dataset name with one of the "
                          f"prefixes {', '.join(p + '/' for p in TIMM_PREFIXES)} (e.g. 'wds/imagenet')")
    for path, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}={value!r} is not a finite number")
    for path in _POSITIVE:
        if values[path] < 1:
            raise ConfigError(f"{path}={values[path]!r} must be >= 1")
    if config.data.decode == "gpu":
        if config.data.dataset != "imagefolder":
            raise ConfigError(f"data.decode='gpu' decodes the files of an imagefolder dataset, not "
                              f"data.dataset={config.data.dataset!r}; set data.decode='cpu'")
        if config.augment.auto_augment or config.augment.color_jitter:
            raise ConfigError(
                f"data.decode='gpu' crops, flips and erases on the device but has no RandAugment or color jitter "
                f"(augment.auto_augment={config.augment.auto_augment!r}, augment.color_jitter="
                f"{config.augment.color_jitter!r}); set augment.auto_augment=None augment.color_jitter=0, or "
                "data.decode='cpu'")
    if config.distill.kind != "none" and not config.distill.teacher:
        raise ConfigError(f"distill.kind={config.distill.kind!r} needs distill.teacher (a timm model name)")
    for path, (in_range, allowed) in _RANGES.items():
        if values[path] is not None and not in_range(values[path]):
            raise ConfigError(f"{path}={values[path]!r} {allowed}")
    for path in ("data.mean", "data.std"):
        if len(values[path]) != 3:
            raise ConfigError(f"{path}={values[path]!r} needs one value per image channel (3)")
    check_model_name(config.model.name)
    check_model_options(config.model)
    check_optimizer_and_schedule(config.optim.opt, config.schedule.sched)


# path -> (whether a value is allowed, what is allowed); None values are checked elsewhere or mean "off"
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "optim.lr": (lambda v: v > 0, "must be > 0 (or None to scale optim.lr_per_512 with the batch)"),
    "optim.lr_per_512": (lambda v: v > 0, "must be > 0"),
    "optim.weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "data.workers": (lambda v: v >= 0, "must be >= 0 (0 loads data in the main process)"),
    "data.max_bad_images": (lambda v: v >= 0, "must be >= 0 (0 stops at the first image that cannot be decoded)"),
    "data.val_fraction": (lambda v: 0 < v < 1,
                          "must be between 0 and 1 (exclusive): the share of the digits held out for validation"),
    "data.crop_pct": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "augment.mixup": (lambda v: v >= 0, "must be >= 0 (0 turns mixup off)"),
    "augment.cutmix": (lambda v: v >= 0, "must be >= 0 (0 turns CutMix off)"),
    "augment.re_prob": (lambda v: 0 <= v <= 1, "must be a probability in [0, 1]"),
    "augment.label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "schedule.warmup_epochs": (lambda v: v >= 0, "must be >= 0"),
    "ema_decay": (lambda v: 0 < v < 1, "must be in (0, 1), e.g. 0.9998 (or None for no EMA)"),
    "seed": (lambda v: 0 <= v < 2**31, "must be in [0, 2**31): NumPy takes seeds (plus the process rank) below 2**32"),
}
# timm builds these schedules (create_scheduler_v2); used only to suggest a name
_SCHEDULE_NAMES = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "rsqrt")


def _did_you_mean(name: str, choices: typing.Iterable[str], cutoff: float = 0.6, prefix: str = "",
                  otherwise: str = "") -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=cutoff)
    return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else otherwise


def check_model_name(name: str) -> None:
    """Refuse a model name that is not registered with timm, suggesting close ones.

    Args:
        name: A timm model name (vitblocks models included), optionally with a tag.

    Raises:
        ConfigError: For an unknown name.
    """
    import vitblocks.models  # noqa: F401  (its registrations; already done by `import vitblocks`)

    if not timm.is_model(name):
        raise ConfigError(f"model.name={name!r} is not a registered model{_did_you_mean(name, timm.list_models())} "
                          "(python -m vitblocks.summary 'sret*' lists vitblocks' models)")


@functools.lru_cache(maxsize=None)
def check_optimizer_and_schedule(opt: str, sched: str) -> None:
    """Refuse an optimizer timm does not register or a schedule timm cannot build.

    Args:
        opt: `optim.opt`.
        sched: `schedule.sched`.

    Raises:
        ConfigError: Naming the value, with suggestions.
    """
    from timm.optim import list_optimizers
    from timm.scheduler import create_scheduler_v2

    names = list_optimizers()
    if opt.lower().split("_")[-1] not in names:
        raise ConfigError(f"optim.opt={opt!r} is not one of timm's optimizers{_did_you_mean(opt, names)}")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        create_scheduler_v2(probe, sched, num_epochs=2, updates_per_epoch=1)
    except Exception:  # noqa: BLE001 - timm raises differently for unknown or malformed names
        raise ConfigError(f"schedule.sched={sched!r} is not a schedule timm builds"
                          f"{_did_you_mean(sched, _SCHEDULE_NAMES)} (one of {', '.join(_SCHEDULE_NAMES)})") from None


WEIGHT_SOURCES = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
"""Model options that load weights from elsewhere: dropped where a model is rebuilt for weights it is given."""

# arguments timm.create_model and its builders take besides the model class's own
_CREATE_MODEL_OPTIONS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "scriptable",
    "exportable", "no_jit", "features_only", "out_indices", "feature_cls", "feature_cfg", "output_stride",
})


def model_options(name: str) -> frozenset[str] | None:
    """The keyword arguments a registered model takes, from its class's constructor.

    Args:
        name: A registered timm model name.

    Returns:
        The names, or None when they cannot be known (an unknown model, or a
        constructor that takes `**kwargs`).
    """
    import vitblocks.models  # noqa: F401  (its registrations; already done by `import vitblocks`)
    from vitblocks.models.create import model_parameters

    if not timm.is_model(name):
        return None
    try:
        parameters = model_parameters(name)
    except Exception:  # noqa: BLE001 - a model that cannot be built with its defaults: not checked
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters) | _CREATE_MODEL_OPTIONS


def check_model_options(model: ModelConfig) -> None:
    """Refuse model options the model does not take, suggesting the closest ones.

    Args:
        model: The model section of a config.

    Raises:
        ConfigError: For an unknown option, with a did-you-mean.
    """
    if "num_classes" in model.kwargs:  # the trainer passes data.num_classes: this copy would be ignored
        raise ConfigError(f"model.kwargs.num_classes={model.kwargs['num_classes']!r}: the model takes its class "
                          "count from data.num_classes; set that instead")
    known = model_options(model.name) if model.kwargs else None
    for key in model.kwargs if known else ():
        if key not in known:
            raise ConfigError(f"model.kwargs.{key}: {model.name} takes no option {key!r}{_did_you_mean(key, sorted(known))}")
    for key in model.convert:
        if key not in CONVERT_OPTIONS:
            raise ConfigError(f"model.convert.{key} is not a conversion option{_did_you_mean(key, CONVERT_OPTIONS)} "
                              f"(options: {', '.join(CONVERT_OPTIONS)})")
    if model.convert and "base_checkpoint" not in model.convert:
        raise ConfigError("model.convert needs base_checkpoint: the trained weights of the unshared "
                          f"{model.name} to convert (a trainer checkpoint, state dict or .safetensors file), "
                          "or None to convert the weights the model is built with (model.kwargs.pretrained=True)")


CONVERT_OPTIONS = ("base_checkpoint", "loops", "share", "init", *relaxation_options())
"""Keys of `model.convert`."""


def iter_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Walk the leaf fields of a config.

    Args:
        obj: A config dataclass.
        prefix: Path prefix of `obj`'s fields.

    Yields:
        (dotted path, value) for every field that is not itself a config.
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, f"{path}.")
        else:
            yield path, value


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as nested plain data (for checkpoints).

    Args:
        config: The config.

    Returns:
        Nested dicts of plain values.
    """
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from `to_dict` output.

    Args:
        data: Nested dicts.

    Returns:
        The config.
    """
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for old, new in _RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if old_key in data.get(old_section, {}):
            data[new_section][new_key] = data[old_section].pop(old_key)
    return _build(TrainConfig, data)


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kwargs[f.name] = _build(hints[f.name], value) if dataclasses.is_dataclass(hints[f.name]) else value
    return cls(**kwargs)


def format_config(config: TrainConfig) -> str:
    """Render a config for `--print-config`.

    Args:
        config: The config.

    Returns:
        One `path = value` line per field.
    """
    return "\n".join(f"{path} = {value!r}" for path, value in iter_fields(config))


def _coerce(path: str, raw: str, hint: Any) -> Any:
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # bare words are strings: model.name=sret_s
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    for option in options:
        base = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return None
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is tuple and isinstance(value, (list, tuple)):
            return tuple(value)
        if base in (bool, int, str, dict) and type(value) is base:
            return value
        if base is typing.Any:
            return value
    expected = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    raise ConfigError(f"{path}={raw!r}: expected {expected}, got {type(value).__name__}")


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply `path=value` overrides (values are Python literals or bare strings).

    A path may end inside a dict field: `model.kwargs.drop_path_rate=0.2`.

    Args:
        config: The config (not modified).
        overrides: `path=value` strings.

    Returns:
        A new config with the overrides applied.

    Raises:
        ConfigError: For a malformed override, an unknown path (with the closest valid
            paths), or a value of the wrong type.
    """
    config = dataclasses.replace(config)
    valid = [path for path, _ in iter_fields(config)]
    for item in overrides:
        path, sep, raw = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise ConfigError(f"override {item!r} is not of the form path=value (e.g. optim.lr=1e-3)")
        parts = path.split(".")
        target: Any = config
        for depth, name in enumerate(parts):
            if isinstance(target, dict):
                target[".".join(parts[depth:])] = literal_value(raw)
                break
            if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
                if path in _RENAMED:
                    raise ConfigError(f"config key {path!r} is now {_RENAMED[path]!r}")
                hint = _did_you_mean(path, valid, cutoff=0.5, otherwise="; see --print-config for all keys")
                raise ConfigError(f"unknown config key {path!r}{hint}")
            if depth == len(parts) - 1:
                hint = typing.get_type_hints(type(target))[name]
                setattr(target, name, _coerce(path, raw.strip(), hint))
            else:
                child = getattr(target, name)
                child = dataclasses.replace(child) if dataclasses.is_dataclass(child) else dict(child) if isinstance(child, dict) else child
                setattr(target, name, child)
                target = child
    validate(config)
    return config


def literal_value(raw: str) -> Any:
    """A command-line value: a Python literal when it reads as one, else the bare word as a string.

    Args:
        raw: E.g. "(32, 64)", "0.5", "avg".

    Returns:
        E.g. (32, 64), 0.5, "avg".
    """
    try:
        return ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        return raw.strip()


def derive_recipe(recipe_file: str | Path, base: str, overrides: list[str]) -> TrainConfig:
    """A recipe that is another recipe with some fields changed.

    Args:
        recipe_file: The deriving recipe's own path (pass `__file__`).
        base: The base recipe, relative to `recipe_file`'s folder.
        overrides: `path=value` changes, as on the command line.

    Returns:
        The base recipe's config with the overrides applied.

    Example:
        >>> config = derive_recipe("recipes/sret_lt.py", "sret_pit.py", ["model.name=sret_lt"])
        >>> config.model.name, config.schedule.warmup_epochs
        ('sret_lt', 30)
    """
    return apply_overrides(load_recipe(Path(recipe_file).parent / base), overrides)


def derive(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of a config with some fields changed, nested sections by dicts.

    Typed Python all the way: values are not parsed from strings, and the result is
    validated like any config (unknown fields and model options are refused).

    Args:
        config: The base config (not modified).
        **changes: Top-level fields, e.g. `epochs=100`; a section changed by a dict of
            its fields, e.g. `model={"name": "sret_s"}`; `model.kwargs` by a dict that
            is merged into the base's.

    Returns:
        The new config.

    Raises:
        ConfigError: For an unknown field (with the closest valid ones) or a bad value.

    Example:
        >>> base = load_recipe("recipes/sret_t_imagenet.py")
        >>> config = derive(base, model={"name": "sret_lt"}, epochs=100)
        >>> config.model.name, config.epochs, config.schedule.warmup_epochs
        ('sret_lt', 100, 30)
    """
    return _derive(config, changes, "")


def _derive(obj: Any, changes: dict[str, Any], prefix: str) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    values = {}
    for name, value in changes.items():
        if name not in names:
            hint = _did_you_mean(name, sorted(names), cutoff=0.5, prefix=prefix)
            raise ConfigError(f"unknown config key {prefix + name!r}{hint}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            value = _derive(current, value, f"{prefix}{name}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            value = {**current, **value}
        values[name] = value
    try:
        return dataclasses.replace(obj, **values)
    except TypeError as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from None


def smoke_config(config: TrainConfig, steps: int = 3) -> TrainConfig:
    """The same recipe on synthetic data of its shape, for a few steps on any machine.

    Args:
        config: The recipe's config.
        steps: Optimizer steps to run.

    Returns:
        A one-epoch config on synthetic data, writing to `<output_dir>/smoke`.
    """
    batch = min(config.data.batch_size, 4)
    precision = config.precision if torch.cuda.is_available() else "fp32"
    weights = {}  # a smoke run converts and distills from whatever weights the models are built with
    if config.model.convert:
        weights["model"] = {"convert": {"base_checkpoint": None}}
    if config.distill.teacher_checkpoint:
        weights["distill"] = {"teacher_checkpoint": None}
    return derive(
        config, epochs=1, precision=precision, output_dir=str(Path(config.output_dir) / "smoke"), **weights,
        data=dict(dataset="synthetic", batch_size=batch, workers=0,
                  synthetic_samples=batch * config.optim.accum_steps * steps),
        augment=dict(repeated_aug=False), schedule=dict(warmup_epochs=0),
    )


def load_recipe(path: str | Path) -> TrainConfig:
    """Run a recipe file and return its `config`.

    Args:
        path: The recipe file.

    Returns:
        The recipe's config.

    Raises:
        FileNotFoundError: If the file does not exist.
        ConfigError: If it defines no `TrainConfig` named `config`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recipe at {str(path)!r}; recipes are Python files such as recipes/quickstart.py")
    if path.suffix.lower() in (".yaml", ".yml", ".json", ".toml"):
        raise ConfigError(f"{path}: recipes are Python files that assign config = TrainConfig(...), such as "
                          f"recipes/quickstart.py; a {path.suffix} file is not read. Write its fields as a Python "
                          "recipe, or start from one and change fields with --set key=value")
    try:
        namespace = runpy.run_path(str(path))
    except SyntaxError as error:
        raise ConfigError(f"{error.filename}:{error.lineno}: {error.msg} (the recipe is not valid Python)") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - whatever the recipe's own code raised, with the recipe's line
        raise ConfigError(f"{_recipe_location(error, path)}: {type(error).__name__}: {error}"
                          f"{_unknown_field_hint(error)}") from None
    config = namespace.get("config")
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"{path} must assign a vitblocks.train.TrainConfig to the name 'config'")
    return config


def _recipe_location(error: Exception, path: Path) -> str:
    """`path:line` of the recipe line the error came from (the innermost frame in the recipe file)."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if Path(frame.filename) == path]
    return f"{path}:{lines[-1]}" if lines else str(path)


def _unknown_field_hint(error: Exception) -> str:
    """For `SomeConfig(fieldz=...)`: the closest field names of that config class."""
    found = re.search(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(error))
    cls = globals().get(found.group(1)) if found else None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return ""
    names = [f.name for f in dataclasses.fields(cls)]
    return _did_you_mean(found.group(2), names, otherwise=f" ({cls.__name__} fields: {', '.join(names)})")
