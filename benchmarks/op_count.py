"""What one eager training step dispatches: aten operators and the bytes they touch.

    python -m benchmarks.op_count                       # the committed CPU table
    python -m benchmarks.op_count sret_t --top 25       # one model, with its costliest operators

On a GPU an eager step launches about one kernel per aten operator, and at small widths
each launch costs more host time than the kernel itself; the bytes each operator reads
and writes bound what the step costs in memory traffic. Both are counted on the CPU with
a `TorchDispatchMode` that sees every operator after autocast, forward and backward
separately (view operators, which launch nothing, are not counted). The optimizer is left
out: it is the same code for every model.

Operator counts do not depend on the batch size. Bytes are affine in it (weights are read
once per step, activations once per image), so they are measured at two batch sizes and
reported per image at `--per-image-batch` (256, the GPU benchmark's training batch).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vitblocks  # noqa: F401  (registers the models)
from vitblocks.attention import attention_backend

MODELS = ("sret_t", "deit_tiny_patch16_224", "pit_ti_224", "deit_tiny_rec_sliced_patch16_224")
BASELINE = "deit_tiny_patch16_224"
# the step issue's targets for an eager bf16 forward + backward of SReT-T against DeiT-Tiny
TARGETS = {"ops": 2.5, "bytes_per_image": 1.6}
OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "cpu"


def _tensor_bytes(tree: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor))


class OpCounter(TorchDispatchMode):
    """Count the non-view aten operators run inside the block, and the bytes they touch.

    The bytes of an operator are those of its tensor inputs (read) plus those of its
    tensor outputs (written), counted by element, so a view input counts only the
    elements it shows.

    Attributes:
        ops: Operator name -> calls.
        bytes: Operator name -> bytes touched.

    Example:
        >>> with OpCounter() as counter:
        ...     y = torch.ones(4).view(2, 2) * 2
        >>> dict(counter.ops), counter.total_bytes
        ({'aten.ones.default': 1, 'aten.mul.Tensor': 1}, 64)
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            name = str(func)
            self.ops[name] += 1
            self.bytes[name] += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        return out

    @property
    def total_ops(self) -> int:
        """Operators counted."""
        return sum(self.ops.values())

    @property
    def total_bytes(self) -> int:
        """Bytes touched by them."""
        return sum(self.bytes.values())


@dataclass
class StepCount:
    """Operators and bytes of one training step's forward and backward passes.

    Attributes:
        forward: Operator name -> calls in the forward pass.
        backward: Operator name -> calls in the backward pass.
        bytes: Total bytes touched, forward and backward, by batch size.
    """

    forward: Counter[str] = field(default_factory=Counter)
    backward: Counter[str] = field(default_factory=Counter)
    bytes: dict[int, int] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        """Operators of forward and backward together."""
        return sum(self.forward.values()) + sum(self.backward.values())

    def bytes_per_image(self, batch: int) -> float:
        """Bytes per image of a step at `batch`, from the affine fit over the measured sizes."""
        (b0, y0), (b1, y1) = sorted(self.bytes.items())[:1] + sorted(self.bytes.items())[-1:]
        per_image = (y1 - y0) / (b1 - b0)
        return (y0 - per_image * b0) / batch + per_image


def count_step(model: torch.nn.Module, batch_sizes: tuple[int, int], img_size: int,
               dtype: torch.dtype | None = torch.bfloat16) -> StepCount:
    """Count one training step's forward and backward passes (autocast to `dtype`, CPU).

    Args:
        model: The model, in training mode.
        batch_sizes: Two batch sizes to measure bytes at (operators come from the first).
        img_size: Square input size.
        dtype: Autocast dtype, or None for fp32.

    Returns:
        The counts.
    """
    result = StepCount()
    for index, batch in enumerate(batch_sizes):
        images = torch.randn(batch, 3, img_size, img_size)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with OpCounter() as forward:
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = model(images).float().logsumexp(-1).mean()
        with OpCounter() as backward:
            loss.backward()
        if index == 0:
            result.forward, result.backward = forward.ops, backward.ops
        result.bytes[batch] = forward.total_bytes + backward.total_bytes
    return result


def build(name: str, img_size: int, drop_path_rate: float) -> torch.nn.Module:
    """A registered model in training mode, at `img_size`, with the given drop-path rate."""
    return timm.create_model(name, img_size=img_size, drop_path_rate=drop_path_rate).train()


def table(counts: dict[str, StepCount], per_image_batch: int) -> str:
    """Markdown table of operators and bytes per image, with ratios to the baseline."""
    base = counts.get(BASELINE)
    lines = ["| model | aten ops (fwd + bwd) | forward | backward | MB per image | ops / deit_tiny | "
             "bytes / deit_tiny |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in counts.items():
        mb = c.bytes_per_image(per_image_batch) / 1e6
        ratios = ("", "") if base is None else (
            f"{c.ops / base.ops:.2f}x",
            f"{c.bytes_per_image(per_image_batch) / base.bytes_per_image(per_image_batch):.2f}x")
        lines.append(f"| {name} | {c.ops:,} | {sum(c.forward.values()):,} | {sum(c.backward.values()):,} | "
                     f"{mb:.0f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def costliest(c: StepCount, rows: int) -> str:
    """The most frequent operators of a step, forward and backward."""
    both = c.forward + c.backward
    lines = ["| operator | forward | backward |", "|---|---:|---:|"]
    lines += [f"| `{op}` | {c.forward[op]} | {c.backward[op]} |" for op, _ in both.most_common(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.op_count", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="2,4", help="two batch sizes to fit bytes per image on")
    parser.add_argument("--per-image-batch", type=int, default=256)
    parser.add_argument("--drop-path-rate", type=float, default=0.1, help="the same for every model")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--backend", default="sdpa",
                        help="vitblocks' attention backend (default sdpa, the kernel a GPU runs: on the CPU, auto "
                             "picks math for bf16 short groups)")
    parser.add_argument("--top", type=int, default=0, help="also list each model's most frequent operators")
    parser.add_argument("--out", type=Path, default=None, help="folder for op_count.md and op_count.json")
    args = parser.parse_args(argv)
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    if len(batches) != 2 or batches[0] == batches[1]:
        parser.error("--batch-sizes takes two different sizes, e.g. 2,4")
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    counts = {}
    with attention_backend(args.backend):
        for name in args.models:
            torch.manual_seed(0)
            counts[name] = count_step(build(name, args.img_size, args.drop_path_rate), batches, args.img_size, dtype)
    text = (f"Eager training step (forward + backward, no optimizer), {args.precision} autocast on the CPU, "
            f"{args.img_size} px, drop path {args.drop_path_rate} for every model, vitblocks attention by "
            f"{args.backend}; bytes per image at batch "
            f"{args.per_image_batch} (fitted on batches {batches[0]} and {batches[1]}). "
            f"`python -m benchmarks.op_count`\n\n{table(counts, args.per_image_batch)}\n")
    if args.top:
        text += "".join(f"\n### {name}\n\n{costliest(c, args.top)}\n" for name, c in counts.items())
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "op_count.md").write_text(text)
        record = {"img_size": args.img_size, "precision": args.precision, "drop_path_rate": args.drop_path_rate,
                  "per_image_batch": args.per_image_batch, "backend": args.backend, "targets": TARGETS,
                  "baseline": BASELINE,
                  "models": {name: {"forward": dict(c.forward), "backward": dict(c.backward), "bytes": c.bytes,
                                    "ops": c.ops,
                                    "bytes_per_image": c.bytes_per_image(args.per_image_batch)}
                             for name, c in counts.items()}}
        (args.out / "op_count.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
