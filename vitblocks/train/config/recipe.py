"""Recipes: loading a config from a recipe file, changing it, and its plain-data form.

A recipe derived from another changes typed fields with `derive`:

    config = derive(load_recipe(RECIPES / "sret_t_imagenet.py"), model={"name": "sret_s"}, epochs=100)

On the command line any field can be overridden by its dotted path:
`--set optim.lr=1e-3 epochs=5`; `apply_overrides` types the values and derives the
config. Model options (`model.kwargs`) are checked against the model's constructor when
the config is built.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import runpy
import traceback
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

import vitblocks.train.config.schema as schema
from vitblocks.train.config.fields import did_you_mean, field_hint, iter_fields
from vitblocks.train.config.schema import TrainConfig
from vitblocks.train.errors import ConfigError

_RENAMED = {"model.attn_backend": "model.backend"}
"""Keys of configs stored in older checkpoints -> their current names."""

_MOVED_OPTIONS = {
    "backend": ("backend", "auto", True),
    "attn_backend": ("backend", "auto", True),
    "grad_checkpointing": ("grad_checkpointing", False, False),
}
"""Model options that earlier configs could give in `model.kwargs` and that are now a field of the model
section: option -> (field, its default, whether the option won over a field set too, as it did when it
reached the model's constructor)."""

_LEGACY_VALUES = {("optim", "clip_grad"): {0: None}}
"""Values of configs stored in older checkpoints that now read otherwise: clip_grad=0 meant no clipping."""


@dataclasses.dataclass(frozen=True)
class Replace:
    """A value for `derive` that replaces a dict field instead of being merged into it.

    Attributes:
        value: The field's new value.
    """

    value: Any


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as nested plain data (for checkpoints).

    Args:
        config: The config.

    Returns:
        Nested dicts of plain values.
    """
    return dataclasses.asdict(config)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from `to_dict` output (a stored config of any earlier release: `migrated`).

    Args:
        data: Nested dicts.

    Returns:
        The config.
    """
    return _build(TrainConfig, migrated(data))


def migrated(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config as plain data, in today's spelling: renamed fields, legacy values, and model
    options now spelled by a field of their own (`model.kwargs.backend` -> `model.backend`, ...).

    Args:
        data: Nested dicts, as `to_dict` wrote them (not modified).

    Returns:
        A copy in today's spelling.

    Examples:
        >>> old = {"model": {"name": "sret_t", "kwargs": {"backend": "math"}, "backend": "auto"}}
        >>> new = migrated(old)["model"]
        >>> new["backend"], new["kwargs"]
        ('math', {})
    """
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in data.items()}
    for old, new in _RENAMED.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if old_key in data.get(old_section, {}):
            data[new_section][new_key] = data[old_section].pop(old_key)
    for (section, key), meanings in _LEGACY_VALUES.items():
        value = data.get(section, {}).get(key)
        if value in meanings and not isinstance(value, bool):
            data[section][key] = meanings[value]
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("kwargs"), dict):
        model["kwargs"] = kwargs = dict(model["kwargs"])
        for option, (name, default, option_won) in _MOVED_OPTIONS.items():
            if option in kwargs:
                value = kwargs.pop(option)
                if option_won or model.get(name, default) == default:
                    model[name] = value
    return data


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
    value = literal_value(raw)
    options = (typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
               else (hint,))
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

    A path may end inside a dict field: `model.kwargs.drop_path_rate=0.2`. Each value is
    typed by its field's annotation, and the changes are applied by `derive`, the one
    way a config is changed.

    Args:
        config: The config (not modified).
        overrides: `path=value` strings.

    Returns:
        A new config with the overrides applied.

    Raises:
        ConfigError: For a malformed override, an unknown path (with the closest valid
            paths), or a value of the wrong type.
    """
    valid = [path for path, _ in iter_fields(config)]
    changes: dict[str, Any] = {}
    for item in overrides:
        path, sep, raw = item.partition("=")
        path = path.strip()
        if not sep or not path:
            raise ConfigError(f"override {item!r} is not of the form path=value (e.g. optim.lr=1e-3)")
        parts = path.split(".")
        target: Any = config
        section = changes
        for depth, name in enumerate(parts):
            if isinstance(target, dict):  # inside a dict field: the rest of the path is one key
                section[".".join(parts[depth:])] = literal_value(raw)
                break
            if not dataclasses.is_dataclass(target) or name not in {f.name for f in dataclasses.fields(target)}:
                if path in _RENAMED:
                    raise ConfigError(f"config key {path!r} is now {_RENAMED[path]!r}")
                hint = did_you_mean(path, valid, cutoff=0.5, otherwise="; see --print-config for all keys")
                raise ConfigError(f"unknown config key {path!r}{hint}")
            if depth == len(parts) - 1:
                section[name] = Replace(_coerce(path, raw.strip(), field_hint(type(target), name)))
            else:
                target = getattr(target, name)
                section = section.setdefault(name, {})
    return derive(config, **changes)


def check_allowed_fields(names: Iterable[str], config: TrainConfig) -> tuple[str, ...]:
    """Check the fields given to `--resume-changed`: config fields, sections, or keys of dict fields.

    Args:
        names: Dotted paths, e.g. `["data.img_size", "model.kwargs.drop_path_rate"]`.
        config: The config whose fields they name.

    Returns:
        The names.

    Raises:
        ConfigError: For a name that is no field, with the closest ones.

    Examples:
        >>> check_allowed_fields(["seed", "model.kwargs.drop_path_rate"], TrainConfig())
        ('seed', 'model.kwargs.drop_path_rate')
    """
    fields = dict(iter_fields(config))
    sections = {path.rsplit(".", 1)[0] for path in fields if "." in path}
    dicts = [path for path, value in fields.items() if isinstance(value, dict)]
    for name in names:
        if name in fields or name in sections or any(name.startswith(path + ".") for path in dicts):
            continue
        raise ConfigError(f"--resume-changed {name}: no config field of that name"
                          f"{did_you_mean(name, list(fields), cutoff=0.5, otherwise='; see --print-config')}")
    return tuple(names)


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

    Examples:
        >>> config = derive_recipe("recipes/sret_lt.py", "sret_pit.py", ["model.name=sret_lt"])
        >>> config.model.name, config.schedule.warmup_epochs
        ('sret_lt', 30)
    """
    return apply_overrides(load_recipe(Path(recipe_file).parent / base), overrides)


def derive(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy of a config with some fields changed, nested sections by dicts.

    Typed Python all the way: values are not parsed from strings, and the result is
    validated like any config (unknown fields and bad values are refused). What it names
    in timm's registries (model, model options, optimizer, schedule) is checked by
    `vitblocks.train.config.checks.check_names`: by the command line before anything is
    built, and by the builders when they build.

    Args:
        config: The base config (not modified).
        **changes: Top-level fields, e.g. `epochs=100`; a section changed by a dict of
            its fields, e.g. `model={"name": "sret_s"}`; `model.kwargs` by a dict that
            is merged into the base's.

    Returns:
        The new config.

    Raises:
        ConfigError: For an unknown field (with the closest valid ones) or a bad value.

    Examples:
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
            hint = did_you_mean(name, sorted(names), cutoff=0.5, prefix=prefix)
            raise ConfigError(f"unknown config key {prefix + name!r}{hint}")
        current = getattr(obj, name)
        if isinstance(value, Replace):  # a whole field given on the command line: not merged
            value = value.value
        elif dataclasses.is_dataclass(current) and isinstance(value, dict):
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
    cls = getattr(schema, found.group(1), None) if found else None
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return ""
    names = [f.name for f in dataclasses.fields(cls)]
    return did_you_mean(found.group(2), names, otherwise=f" ({cls.__name__} fields: {', '.join(names)})")
