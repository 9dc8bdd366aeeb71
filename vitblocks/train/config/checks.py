"""Checks of a config that its fields' own rules do not express: across fields, and against registries.

`validate` runs when a `TrainConfig` is made (and so on every `derive`): every field's
declared rule (`vitblocks.train.config.fields.check_field_rules`), then the rules that
involve several fields and the dataset name; nothing is built and no registry is asked.
`check_names` holds what the config names against timm's registries (the model, its
options, the optimizer and the schedule); `build_model`, `build_optimizer_and_schedule`
and the command line run it before anything is built.
"""

from __future__ import annotations

import functools
import inspect
import typing

import timm
import torch

from vitblocks.layers.relaxation import relaxation_options
from vitblocks.train.config.fields import check_field_rules, did_you_mean
from vitblocks.train.config.names import TIMM_PREFIXES, is_timm_dataset
from vitblocks.train.errors import ConfigError

if typing.TYPE_CHECKING:
    from vitblocks.train.config.schema import ModelConfig, TrainConfig

DATASETS = ("imagefolder", "digits", "synthetic")
"""`data.dataset` values besides timm's dataset names."""

# timm builds these schedules (create_scheduler_v2); used only to suggest a name
_SCHEDULE_NAMES = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "rsqrt")


def validate(config: TrainConfig) -> None:
    """Check values that types alone do not constrain.

    Args:
        config: The config to check.

    Raises:
        ConfigError: Naming the field, its value and what is allowed.
    """
    check_field_rules(config)
    dataset = config.data.dataset
    if dataset not in DATASETS and not is_timm_dataset(dataset):
        raise ConfigError(f"data.dataset={dataset!r} is not one of {DATASETS} nor a timm dataset name with one of the "
                          f"prefixes {', '.join(p + '/' for p in TIMM_PREFIXES)} (e.g. 'wds/imagenet')")
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
    for path, values in (("data.mean", config.data.mean), ("data.std", config.data.std)):
        if len(values) != 3:
            raise ConfigError(f"{path}={values!r} needs one value per image channel (3)")
    check_model_section(config.model)


def check_names(config: TrainConfig) -> None:
    """Check what a config names in timm's registries: model, model options, optimizer, schedule.

    Args:
        config: The config.

    Raises:
        ConfigError: Naming the value, with the closest registered names.
    """
    check_model_name(config.model.name)
    check_model_options(config.model)
    check_optimizer_and_schedule(config.optim.opt, config.schedule.sched)


def check_model_name(name: str) -> None:
    """Refuse a model name that is not registered with timm, suggesting close ones.

    Args:
        name: A timm model name (vitblocks models included), optionally with a tag.

    Raises:
        ConfigError: For an unknown name.
    """
    import vitblocks.models  # noqa: F401  (its registrations; already done by `import vitblocks`)

    if not timm.is_model(name):
        raise ConfigError(f"model.name={name!r} is not a registered model{did_you_mean(name, timm.list_models())} "
                          "(python -m vitblocks.summary 'sret*' lists vitblocks' models)")


@functools.cache
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
        raise ConfigError(f"optim.opt={opt!r} is not one of timm's optimizers{did_you_mean(opt, names)}")
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    try:
        # timm raises differently for unknown or malformed names, and timm 1.0.29 returns no schedule
        built = create_scheduler_v2(probe, sched, num_epochs=2, updates_per_epoch=1)[0] is not None
    except Exception:  # noqa: BLE001
        built = False
    if not built:
        raise ConfigError(f"schedule.sched={sched!r} is not a schedule timm builds"
                          f"{did_you_mean(sched, _SCHEDULE_NAMES)} (one of {', '.join(_SCHEDULE_NAMES)})")


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

    The options are read from the model class's constructor (the model is built once
    per name on the meta device, see `model_options`).

    Args:
        model: The model section of a config.

    Raises:
        ConfigError: For an unknown option, with a did-you-mean.
    """
    known = model_options(model.name) if model.kwargs else None
    for key in model.kwargs if known else ():
        if key not in known:
            raise ConfigError(f"model.kwargs.{key}: {model.name} takes no option {key!r}"
                              f"{did_you_mean(key, sorted(known))}")


SPELLED_ELSEWHERE = {
    "num_classes": ("data.num_classes", "the model takes its class count from"),
    "img_size": ("data.img_size", "the model takes its input size from"),
    "backend": ("model.backend", "the attention backend is a setting of its own,"),
    "attn_backend": ("model.backend", "the attention backend is a setting of its own,"),
    "grad_checkpointing": ("model.grad_checkpointing", "activation checkpointing is a setting of its own,"),
}
"""Model options that a config spells as a field of its own: (the field, why), refused in `model.kwargs`."""


def check_model_section(model: ModelConfig) -> None:
    """The model section's own rules, which need no registry: class count and conversion keys.

    Args:
        model: The model section of a config.

    Raises:
        ConfigError: For an option spelled by a field of its own (`SPELLED_ELSEWHERE`:
            `num_classes`, `img_size`, `backend`, `grad_checkpointing`), an unknown conversion key
            or a conversion without its base weights.
    """
    for key, (field, what) in SPELLED_ELSEWHERE.items():
        if key in model.kwargs:  # one road per setting: this copy would override or clash with the field's
            raise ConfigError(f"model.kwargs.{key}={model.kwargs[key]!r}: {what} {field}; set that instead")
    for key in model.convert:
        if key not in CONVERT_OPTIONS:
            raise ConfigError(f"model.convert.{key} is not a conversion option{did_you_mean(key, CONVERT_OPTIONS)} "
                              f"(options: {', '.join(CONVERT_OPTIONS)})")
    if model.convert and "base_checkpoint" not in model.convert:
        raise ConfigError("model.convert needs base_checkpoint: the trained weights of the unshared "
                          f"{model.name} to convert (a trainer checkpoint, state dict or .safetensors file), "
                          "or None to convert the weights the model is built with (model.kwargs.pretrained=True)")


CONVERT_OPTIONS = ("base_checkpoint", "loops", "share", "init", *relaxation_options())
"""Keys of `model.convert`."""
