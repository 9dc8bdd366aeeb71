"""The parts of a training run, each built from the config by one function.

`Trainer` calls these for every part it is not handed, and `vitblocks.eval` reuses
them, so a part can be built, tested or replaced on its own:

    model = build_model(config, device)
    data = build_data(config, runtime)
    optimizer, scheduler, lr = build_optimizer_and_schedule(model, config, data.updates_per_epoch)
    mixup, criterion = build_criterion(config, device)
    trainer = Trainer(config, model=model, data=data, optimizer=(optimizer, scheduler), criterion=(mixup, criterion))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from torch import nn

from vitblocks.io import CheckpointError, read_checkpoint
from vitblocks.layers.per_loop import per_loop_offsets
from vitblocks.models.convert import convert_to_recursive
from vitblocks.models.create import create_model_at_size
from vitblocks.train.config.checks import check_model_name, check_model_options, check_optimizer_and_schedule
from vitblocks.train.config.names import is_timm_dataset
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.data.datasets import ResumableSampler, build_dataset, dataset_classes, dataset_length, sample_form
from vitblocks.train.data.feed import feed_for
from vitblocks.train.data.run_data import Data
from vitblocks.train.data.timm_datasets import is_stream
from vitblocks.train.errors import ConfigError, DataError
from vitblocks.train.process.distributed import Runtime
from vitblocks.train.run.distill import DistillationLoss, build_teacher


def build_model(config: TrainConfig, device: torch.device | str = "cpu", load_base: bool = True) -> nn.Module:
    """The configured timm model at the data's resolution and class count.

    Args:
        config: The experiment.
        device: Where the model goes.
        load_base: With `model.convert`, read the base weights before converting
            (False builds the converted structure only, for weights loaded afterwards).

    Returns:
        The model with the configured activation checkpointing (img_size is passed only
        to models that take it).

    Raises:
        ConfigError: For a model name timm does not register or an option the model
            does not take (with the closest ones), if the model refuses its arguments
            (an image too small for its groups, a bad option value), with the model's
            reason, or if the conversion refuses its options.
        CheckpointError: If the base weights of a conversion cannot be read or do not fit.
    """
    check_model_name(config.model.name)
    check_model_options(config.model)
    try:
        model = create_model_at_size(config.model.name, config.data.img_size,
                                     **dict(config.model.kwargs, num_classes=config.data.num_classes))
    except (ValueError, TypeError) as error:  # the model's own argument checks
        raise ConfigError(f"{config.model.name} cannot be built from this config "
                          f"(data.img_size={config.data.img_size}, "
                          f"model.kwargs={config.model.kwargs}): {error}") from None
    if config.model.convert:
        convert_model(model, config.model.convert, load_base=load_base)
    model = model.to(device)
    if config.model.grad_checkpointing:
        model.set_grad_checkpointing(config.model.grad_checkpointing)
    return model


def convert_model(model: nn.Module, options: dict[str, Any], load_base: bool = True) -> None:
    """Load the base weights into an unshared model and convert it (`model.convert`), in place.

    Args:
        model: The unshared model.
        options: `model.convert`.
        load_base: Read `base_checkpoint` first (None there: convert the weights the
            model was built with).

    Raises:
        ConfigError: If the conversion refuses its options.
        CheckpointError: If the base weights cannot be read or do not fit the model.
    """
    options = dict(options)
    checkpoint = options.pop("base_checkpoint")
    if load_base and checkpoint is not None:
        state = read_checkpoint(checkpoint)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"the base weights {checkpoint} do not fit the model to convert: "
                                  f"{str(error).splitlines()[-1].strip()}") from error
    try:
        convert_to_recursive(model, **options)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model.convert={options}: {error}") from None


def build_data(config: TrainConfig, runtime: Runtime | None = None, train: bool = True,
               classes: list[str] | None = None) -> Data:
    """Datasets and samplers for training and validation.

    Args:
        config: The experiment.
        runtime: Rank and world size (default: one process).
        train: Also build the training set (False: validation only, for evaluation).
        classes: The class list to label by (default: the dataset's own, see
            `dataset_classes`); eval passes the checkpoint's.

    Returns:
        The data.

    Raises:
        DataError: For a missing or malformed dataset.
        ConfigError: If an epoch has fewer batches than `optim.accum_steps`.
    """
    rank, world = (runtime.rank, runtime.world_size) if runtime else (0, 1)
    classes = classes if classes is not None else dataset_classes(config)
    device = runtime.device if runtime else "cpu"
    val_set = build_dataset(config, train=False, classes=classes, device=device)
    if dataset_length(val_set) == 0:
        raise DataError(f"the validation split of {config.data.dataset} holds no images"
                        + _empty_split_hint(config) + "; nothing could be scored")
    val_sampler = ResumableSampler(len(val_set), False, config.seed, rank, world)
    if not train:
        return Data(None, val_set, None, val_sampler, classes=classes, val_feed=feed_for(config, train=False))
    train_set = build_dataset(config, train=True, classes=classes, device=device)
    repeats = 3 if config.augment.repeated_aug else 1
    if is_stream(train_set):  # the sampler only holds the epoch, the samples to skip and the epoch's length
        if config.augment.repeated_aug:
            raise ConfigError(f"augment.repeated_aug=True needs random access to the images; {config.data.dataset} is "
                              "read as a stream: set augment.repeated_aug=False")
        total = getattr(getattr(train_set, "reader", None), "num_samples", None) or len(train_set)
        sampler = ResumableSampler(total, True, config.seed, rank, world)
    else:
        # per-sample seeds only where workers draw augmentation: not for tensors, nor for workers that read bytes
        draws = sample_form(config) == "uint8"
        sampler = ResumableSampler(len(train_set), True, config.seed, rank, world, repeats, draws=draws)
    accum = config.optim.accum_steps
    # whole updates only: a batch left over would carry its gradients into the next epoch's first update
    batches = len(sampler) // config.data.batch_size
    steps = batches // accum * accum
    if steps < accum:
        more = " or raise data.synthetic_samples" if config.data.dataset == "synthetic" else ""
        raise ConfigError(
            f"the training set gives {batches} batches of {config.data.batch_size} per epoch and process, "
            f"fewer than optim.accum_steps={config.optim.accum_steps} ({len(sampler)} images per process); "
            f"lower data.batch_size{more}"
        )
    return Data(train_set, val_set, sampler, val_sampler, steps, steps // accum, classes,
                feed_for(config, train=True), feed_for(config, train=False))


def _empty_split_hint(config: TrainConfig) -> str:
    data = config.data
    if data.dataset == "digits":
        return f" (data.val_fraction={data.val_fraction} of the 1797 digits rounds to none): raise data.val_fraction"
    if is_timm_dataset(data.dataset):
        return f" (data.val_split={data.val_split!r} in {data.root}): check the split's name and sample count"
    return ""


FUSED_OPTIMIZERS = ("adam", "adamw")
"""Optimizer names whose PyTorch class has a fused kernel (`optim.fused`)."""


def build_optimizer_and_schedule(
    model: nn.Module, config: TrainConfig, updates_per_epoch: int, world_size: int = 1
) -> tuple[torch.optim.Optimizer, Any, float]:
    """timm's optimizer and per-step schedule for the model.

    Args:
        model: The model (its `no_weight_decay` names, and per-loop offsets of relaxed
            blocks, are exempt from weight decay).
        config: The experiment.
        updates_per_epoch: Optimizer steps per epoch.
        world_size: Processes, for the learning rate of `lr_per_512`.

    Returns:
        (optimizer, scheduler, peak learning rate).

    Raises:
        ConfigError: For an optimizer or schedule timm does not know (with the closest
            names), or `optim.fused=True` for an optimizer without a fused kernel.
    """
    optim = config.optim
    check_optimizer_and_schedule(optim.opt, config.schedule.sched)
    global_batch = config.data.batch_size * optim.accum_steps * world_size
    lr = optim.lr if optim.lr is not None else optim.lr_per_512 * global_batch / 512
    fusable = optim.opt.lower() in FUSED_OPTIMIZERS
    if optim.fused and not fusable:
        raise ConfigError(f"optim.fused=True: PyTorch has a fused kernel for {' and '.join(FUSED_OPTIMIZERS)} only, "
                          f"not {optim.opt!r}; set optim.fused=None")
    fused = {"fused": True} if fusable and optim.fused is not False else {}
    optimizer = create_optimizer_v2(model, optim.opt, lr=lr, weight_decay=optim.weight_decay,
                                    param_group_fn=_offset_aware_groups(model, optim.weight_decay), **fused)
    schedule = config.schedule
    scheduler, _ = create_scheduler_v2(
        optimizer, schedule.sched, num_epochs=config.epochs, warmup_epochs=schedule.warmup_epochs,
        warmup_lr=schedule.warmup_lr, min_lr=schedule.min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler, lr


def _offset_aware_groups(model: nn.Module, weight_decay: float) -> Callable[[nn.Module], list[dict]] | None:
    """timm's weight-decay groups with relaxed blocks' per-loop offsets exempt, like what they offset.

    Returns None (timm's own grouping) for models without such offsets.
    """
    offsets = per_loop_offsets(model)
    if not offsets:
        return None

    def groups(module: nn.Module) -> list[dict]:
        exempt = set(getattr(module, "no_weight_decay", lambda: set())()) | offsets
        return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=exempt)

    return groups


def build_criterion(config: TrainConfig, device: torch.device | str = "cpu") -> tuple[Mixup | None, DistillationLoss]:
    """Mixup / CutMix and the loss (label smoothing, distillation).

    Args:
        config: The experiment.
        device: Where a teacher runs.

    Returns:
        (mixup or None, criterion called as `criterion(images, logits, targets)`).
    """
    aug, classes = config.augment, config.data.num_classes
    mixup = None
    if aug.mixup > 0 or aug.cutmix > 0:
        mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                      switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing, num_classes=classes)
        base: nn.Module = SoftTargetCrossEntropy()
    elif aug.label_smoothing > 0:
        base = LabelSmoothingCrossEntropy(aug.label_smoothing)
    else:
        base = nn.CrossEntropyLoss()
    teacher = None
    if config.distill.kind != "none":
        teacher = build_teacher(config.distill, classes, torch.device(device),
                                allow_random=config.data.dataset == "synthetic")
    return mixup, DistillationLoss(base, teacher, config.distill, config.data.mean, config.data.std)
