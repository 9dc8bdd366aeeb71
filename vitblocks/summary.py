"""Parameters and multiply-accumulates (MACs) of a model, per stage and in total.

    python -m vitblocks.summary sret_t --img-size 224
    python -m vitblocks.summary "sret*" --zoo          # one markdown row per model
    python -m vitblocks.summary "sret*" --zoo --tags --update docs/models.md
    python -m vitblocks.summary deit_tiny_patch16_224 pit_ti_224 --sharing   # schedules and relaxation
    python -m vitblocks.summary sret_t --model-kwargs "routing={'capacity': 0.5}" "groups=((8,1),(4,1),(1,1))"

MACs count convolutions, linear layers and the two attention matmuls, measured with
PyTorch's FLOP counter while attention runs as explicit matmuls (the `math` backend for
vitblocks layers, `fused_attn=False` for timm's): fused kernels are invisible to the
counter on CPU. One MAC is two FLOPs. Token routing gathers a number of tokens fixed by
its capacity, so a routed model's count is what it does at that capacity on any input;
early exit depends on the images (`python -m vitblocks.eval ... --exit-threshold`
reports the mean block applications over a dataset).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import difflib
import importlib.resources
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vitblocks.attention import attention_backend


@dataclass(frozen=True)
class Row:
    """One line of a summary.

    Attributes:
        name: Module path inside the model ("total" for the whole model).
        params: Parameters owned by the module (shared weights counted once).
        macs: Multiply-accumulates for one image.
    """

    name: str
    params: int
    macs: int


def _parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children, with module lists (stages, blocks) expanded one level."""
    parts = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 0:
            parts += [(f"{name}.{i}", grandchild) for i, grandchild in enumerate(child)]
        else:
            parts.append((name, child))
    return parts


def _input_size(model: nn.Module, img_size: int | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, height, width = cfg.get("input_size", (3, 224, 224))
    return (channels, img_size, img_size) if img_size else (channels, height, width)


@contextlib.contextmanager
def _unfused_timm_attention(model: nn.Module) -> Iterator[None]:
    """Make timm attention layers (which decide at construction) run explicit matmuls."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for module in fused:
        module.fused_attn = False
    try:
        yield
    finally:
        for module in fused:
            module.fused_attn = True


def summarize(model: nn.Module, img_size: int | None = None) -> list[Row]:
    """Count parameters and MACs of `model` for one image.

    Args:
        model: Any image model; timm models take their input size from their config.
        img_size: Square input resolution; defaults to the model's configured size.

    Returns:
        One row per part of the model that has parameters or MACs, then a "total" row.

    Examples:
        >>> import timm, vitblocks
        >>> rows = summarize(timm.create_model("sret_t"))
        >>> rows[-1].params, round(rows[-1].macs / 1e9, 3)
        (4755979, 1.112)
    """
    model = model.eval()
    image = torch.zeros(1, *_input_size(model, img_size))
    counter = FlopCounterMode(display=False)
    # grad mode on: torch's module tracker fails under no_grad for modules taking tuples (timm PiT)
    with attention_backend("math"), _unfused_timm_attention(model), counter:
        model(image)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    rows = []
    for name, part in _parts(model):
        row = Row(name, sum(p.numel() for p in part.parameters()), sum(flops.get(f"{root}.{name}", {}).values()) // 2)
        if row.params or row.macs:  # dropouts and other empty parts say nothing
            rows.append(row)
    direct = sum(p.numel() for p in model.parameters(recurse=False))
    if direct:
        rows.append(Row("(own parameters)", direct, 0))
    rows.append(Row("total", sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2))
    return rows


def format_table(rows: list[Row]) -> str:
    """Render rows as an aligned plain-text table.

    Args:
        rows: From `summarize`.

    Returns:
        The table.
    """
    width = max(len(r.name) for r in rows)
    lines = [f"{'part':<{width}}  {'params':>12}  {'GMACs':>9}"]
    for row in rows:
        if row.name == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{row.name:<{width}}  {row.params:>12,}  {row.macs / 1e9:>9.3f}")
    return "\n".join(lines)


def zoo_table(names: list[str], top1: dict[str, float] | None = None) -> str:
    """A markdown table with one row per registered model.

    Args:
        names: Registered model names.
        top1: Reported top-1 (%) by name, where known.

    Returns:
        Markdown with params, GMACs, input size and top-1 per model.
    """
    top1 = top1 or {}
    lines = [
        "| model | params | GMACs | input | paper top-1 (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    measured: dict[str, tuple[int, int, int]] = {}  # tags of one architecture share its numbers
    for name in names:
        arch = name.split(".")[0]
        if arch not in measured:
            model = timm.create_model(arch)
            total = summarize(model)[-1]
            measured[arch] = (total.params, total.macs, _input_size(model, None)[-1])
        params, macs, size = measured[arch]
        accuracy = f"{top1[name]:.1f}" if name in top1 else "—"
        lines.append(f"| `{name}` | {params:,} | {macs / 1e9:.3f} | {size} | {accuracy} |")
    return "\n".join(lines)


SHARING_SETTINGS: tuple[tuple[str, object, dict | None], ...] = (
    ("consecutive", "consecutive", None),
    ("cycle", "cycle", None),
    ("cycle", "cycle", {"rank": 8}),
    ("cycle", "cycle", {"rank": 8, "norms": True, "biases": True}),
)
"""(schedule label, `share`, `relax`) rows of `sharing_table`: every block used twice."""


def _relaxation_label(relax: dict | None) -> str:
    if relax is None:
        return "—"
    extras = [name for name in ("norms", "biases", "layer_scale") if relax.get(name)]
    return f"LoRA rank {relax.get('rank', 0)}" + "".join(f" + per-loop {name}" for name in extras)


def sharing_table(names: list[str], settings: tuple = SHARING_SETTINGS) -> str:
    """A markdown table of parameters and MACs of timm models under sharing schedules and relaxation.

    Each base model is measured as timm builds it, then after `make_recursive(loops=2,
    share=..., relax=...)` for every setting (each unique block used twice).

    Args:
        names: Base timm models (ViT/DeiT, PiT, Swin).
        settings: (schedule label, `share`, `relax`) per row.

    Returns:
        Markdown with unique blocks, parameters and GMACs per row.
    """
    from vitblocks.models.plug import block_stacks, make_recursive

    lines = ["| model | sharing | relaxation | blocks (unique / applied) | params | GMACs |",
             "|---|---|---|---:|---:|---:|"]
    for name in names:
        base = timm.create_model(name)
        depth = sum(len(stack) for _, stack in block_stacks(base))
        total = summarize(base)[-1]
        lines.append(f"| `{name}` | none (timm) | — | {depth} / {depth} | {total.params:,} | {total.macs / 1e9:.3f} |")
        for label, share, relax in settings:
            model = timm.create_model(name)
            plan = make_recursive(model, loops=2, share=share, relax=relax)
            unique = len({path for path, _ in plan.applications.values()})
            total = summarize(model)[-1]
            lines.append(f"| `{name}` | {label}, x2 | {_relaxation_label(relax)} | {unique} / {depth} | "
                         f"{total.params:,} | {total.macs / 1e9:.3f} |")
    return "\n".join(lines)


SHARING_MARKERS = ("<!-- sharing:start -->", "<!-- sharing:end -->")


def paper_top1() -> dict[str, float]:
    """ImageNet-1k top-1 (%) the SReT paper reports, by `model.tag`.

    Read from the package's `models/paper_results.csv`.

    Returns:
        Top-1 by pretrained name, e.g. `{"sret_t.in1k": 76.0, "sret_t.distill_in1k": 77.6, ...}`.

    Examples:
        >>> paper_top1()["sret_t.distill_in1k"]
        77.6
    """
    text = importlib.resources.files("vitblocks.models").joinpath("paper_results.csv").read_text()
    return {row["model"]: float(row["paper_top1"]) for row in csv.DictReader(text.splitlines())}


ZOO_MARKERS = ("<!-- zoo:start -->", "<!-- zoo:end -->")


def update_between_markers(path: str | Path, table: str, markers: tuple[str, str] = ZOO_MARKERS) -> None:
    """Replace the text between two marker lines of a file.

    Args:
        path: The file.
        table: The new text.
        markers: Start and end markers.

    Raises:
        SystemExit: If the file has no marker block.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; --update writes into an existing page between "
                         f"{markers[0]} and {markers[1]} lines")
    text = path.read_text()
    start, end = (re.escape(m) for m in markers)
    if not re.search(f"{start}.*{end}", text, flags=re.S):
        raise SystemExit(f"error: {path} has no {markers[0]} ... {markers[1]} block to update")
    path.write_text(re.sub(f"{start}.*{end}", lambda _: f"{markers[0]}\n{table}\n{markers[1]}", text, flags=re.S))


def _resolve(patterns: list[str], tags: bool = False) -> list[str]:
    names = []
    for pattern in patterns:
        if pattern.startswith("local-dir:") or Path(pattern).is_dir():
            folder = Path(pattern.removeprefix("local-dir:"))
            if not (folder / "config.json").is_file():
                raise SystemExit(f"error: {folder} holds no config.json: give a run folder the trainer wrote (its "
                                 "config.json describes the model), or a registered model name")
            names.append(f"local-dir:{folder}")
            continue
        found = timm.list_models(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if tags and found and all(timm.is_model(n) for n in found):
            found = [tagged for n in found for tagged in (timm.list_models(n, include_tags=True) or [n])]
        if not found or not all(timm.is_model(n) for n in found):
            close = difflib.get_close_matches(pattern, timm.list_models(), n=5)
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise SystemExit(f"error: no registered model matches {pattern!r}{hint}")
        names += found
    return names


def model_kwargs(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` items as `timm.create_model` arguments; values are Python literals, bare words strings.

    Args:
        items: E.g. `["routing={'capacity': 0.5}", "global_pool=avg"]`.

    Returns:
        The arguments.

    Raises:
        SystemExit: For an item without `=`.
    """
    parsed: dict[str, object] = {}
    for item in items:
        key, equals, raw = item.partition("=")
        if not equals or not key.strip():
            raise SystemExit(f"error: --model-kwargs {item!r} is not KEY=VALUE")
        try:
            parsed[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parsed[key.strip()] = raw
    return parsed


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point.

    Args:
        argv: Arguments (default: sys.argv).
    """
    from vitblocks.models.create import create_model_at_size

    parser = argparse.ArgumentParser(prog="python -m vitblocks.summary", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="model names, glob patterns or run folders, e.g. sret_t, 'sret*', "
                                                  "runs/quickstart or local-dir:runs/quickstart")
    parser.add_argument("--img-size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--zoo", action="store_true", help="one markdown row per model instead of per-part tables")
    parser.add_argument("--tags", action="store_true", help="with --zoo: one row per pretrained tag (model.tag)")
    parser.add_argument("--sharing", action="store_true",
                        help="one markdown row per base model and sharing schedule / relaxation (docs/plugged.md)")
    parser.add_argument("--model-kwargs", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="timm.create_model arguments, values as Python literals, e.g. "
                             "\"routing={'capacity': 0.5}\" (MACs of the routed calls: expected at that capacity)")
    parser.add_argument("--update", metavar="FILE",
                        help="with --zoo or --sharing: write the table into FILE between its markers")
    args = parser.parse_args(argv)
    markers = SHARING_MARKERS if args.sharing else ZOO_MARKERS
    if args.update and not Path(args.update).is_file():
        update_between_markers(args.update, "", markers)  # says what is missing before any model is measured
    kwargs = model_kwargs(args.model_kwargs)
    if kwargs and (args.zoo or args.sharing):
        raise SystemExit("error: --model-kwargs applies to the per-part tables; --zoo and --sharing build each "
                         "model as registered: leave one of them out")
    names = _resolve(args.models, tags=args.tags)
    if args.sharing:
        table = sharing_table(names)
        if args.update:
            update_between_markers(args.update, table, markers)
        else:
            print(table)
        return
    if args.zoo:
        table = zoo_table(names, paper_top1())
        if args.update:
            update_between_markers(args.update, table)
        else:
            print(table)
        return
    if args.img_size is not None and args.img_size < 1:
        raise SystemExit(f"error: --img-size {args.img_size} must be a positive number of pixels")
    for name in names:
        try:
            model = create_model_at_size(name, args.img_size, **kwargs)
            size = _input_size(model, args.img_size)
            table = format_table(summarize(model, args.img_size))
        except (ValueError, TypeError) as error:
            size = f" at --img-size {args.img_size}" if args.img_size is not None else ""
            given = f" with --model-kwargs {' '.join(args.model_kwargs)}" if kwargs else ""
            raise SystemExit(f"error: {name} cannot be built{size}{given}: {error}") from None
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as error:
            if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "memory" not in str(error):
                raise
            raise SystemExit(f"error: measuring {name} at --img-size {args.img_size} needs more memory than this "
                             f"machine has ({' '.join(str(error).split())[:200]}); "
                             "choose a smaller --img-size") from None
        print(f"{name} @ {size[1]}x{size[2]}")
        print(table)
        print()


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:  # a message is bad input: print it and exit 2, as argparse does
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            sys.exit(2)
        raise
