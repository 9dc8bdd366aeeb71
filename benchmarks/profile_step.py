"""Where a training step's time goes: the PyTorch profiler's kernel table for one model.

    python -m benchmarks.profile_step sret_t --device cuda --batch-size 256 --precision bf16

Prints the operators that took the most device time (CPU time on the CPU) over a few
profiled steps, after warm-up, and the step time; `--out FILE` also writes the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vitblocks  # noqa: F401  (registers the models)
from benchmarks.run import _step_fn


def profile_table(name: str, device: torch.device, batch: int, img_size: int, precision: str,
                  steps: int = 3, rows: int = 25, compile: bool = False) -> str:
    """Profile training steps of a timm model and tabulate the costliest operators.

    Args:
        name: Model name.
        device: Where to run.
        batch: Images per step.
        img_size: Square input size.
        precision: "fp32" or "bf16" (autocast).
        steps: Profiled steps (after two warm-up steps).
        rows: Operators shown.
        compile: Profile `torch.compile(model)` (compiled before the warm-up).

    Returns:
        The profiler's table, headed by the model and the mean step time.
    """
    model = timm.create_model(name, img_size=img_size).to(device).train()
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    step = _step_fn(torch.compile(model) if compile else model, images, True, precision)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    mode = "torch.compile" if compile else "eager"
    return f"# {name}: training step ({mode}), batch {batch}, {img_size}px, {precision}, {device}\n{table}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="profile torch.compile(model)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    tables = [profile_table(name, torch.device(args.device), args.batch_size, args.img_size, args.precision,
                            args.steps, compile=args.compile) for name in args.models]
    text = "\n\n".join(tables)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
