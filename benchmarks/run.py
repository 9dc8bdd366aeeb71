"""Throughput and memory of SReT against timm baselines, backends and recursion depths.

    python -m benchmarks.run --suite cpu                 # writes benchmarks/results/cpu/
    python -m benchmarks.run --suite cuda --precision bf16
    python -m benchmarks.run --suite cpu --quick         # seconds, to check the harness

Every number is measured in this one process, with warm-up, several repetitions and the
median / IQR; ratios compare rows of the same run. The naive baseline is SReT-T as the
official code computes it: explicit matmul-softmax attention (`math` backend) and
index-gather permutations.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch

import vitblocks
from benchmarks.measure import peak_bytes, time_call
from vitblocks.attention import attention_backend, available_backends


@dataclass
class Result:
    """One measured configuration."""

    group: str
    name: str
    backend: str
    mode: str
    img_s: float
    iqr_pct: float
    peak_mib: float


def _step_fn(model, images, train, precision):
    autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    if not train:
        def infer():
            with torch.no_grad(), autocast:
                model(images)
        return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
    return train_step


def _forward_backward_fn(model, images):
    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(images).float().logsumexp(-1).mean().backward()
    return forward_backward


def measure(group, name, model, images, backend, train, args, memory=True) -> Result:
    """Throughput (images/s) of inference or a training step, and its peak memory.

    The memory of a training step is that of forward + backward (activations and
    gradients); the optimizer's own buffers would otherwise hide the activations.
    """
    model = model.to(images.device).train(train)
    with attention_backend(backend):
        fn = _step_fn(model, images, train, args.precision)
        timing = time_call(fn, images.device, args.warmup, args.repeats)
        peak = peak_bytes(_forward_backward_fn(model, images) if train else fn, images.device) if memory else 0
    return Result(group, name, backend, "train" if train else "infer", images.shape[0] / timing.median,
                  100 * timing.iqr / timing.median, peak / 2**20)


def run_suite(args) -> list[Result]:
    """All benchmark groups of the issue, at the chosen size."""
    device = torch.device("cuda" if args.suite == "cuda" else "cpu")
    size, batch = args.img_size, args.batch_size
    images = torch.randn(batch, 3, size, size, device=device)
    results = []
    fast = "auto"
    models = ["sret_t", "sret_t_unsliced", "sret_lt", "sret_lt_unsliced", "sret_s", "sret_s_unsliced",
              "deit_tiny_patch16_224", "deit_small_patch16_224", "pit_ti_224"]
    if args.quick:
        models = ["sret_t", "sret_t_unsliced", "deit_tiny_patch16_224"]
    for train in (False, True):
        for name in models:
            kwargs = {"img_size": size}
            model = timm.create_model(name, **kwargs)
            results.append(measure("models", name, model, images, fast, train, args))
        sret = timm.create_model("sret_t", img_size=size)
        results.append(measure("naive", "sret_t (math + gather)", sret, images, "math", train, args))
        for backend in available_backends(device):
            results.append(measure("backends", "sret_t", sret, images, backend, train, args, memory=False))
    small = torch.randn(2, 3, 32, 32, device=device)
    for loops in ((10, 100) if args.quick else (10, 100, 1000)):
        for mode in (False, "sqrt"):
            model = timm.create_model("sret_t", img_size=32, num_classes=10, loops=loops // 10, mix="shared",
                                      grad_checkpointing=mode)
            label = f"{loops} applications, checkpointing={mode or 'off'}"
            results.append(measure("recursion", label, model, small, fast, True, args))
    return results


def ratios(results: list[Result]) -> list[str]:
    """The targets of the benchmark issue, as ratios between rows of this run."""
    def img_s(group, name, mode, backend="auto"):
        return next(r.img_s for r in results if (r.group, r.name, r.mode, r.backend) == (group, name, mode, backend))

    lines = []
    for mode in ("train", "infer"):
        naive = img_s("naive", "sret_t (math + gather)", mode, "math")
        lines.append(f"SReT-T {mode}: optimized / naive = {img_s('models', 'sret_t', mode) / naive:.2f}x (target 1.5x)")
        lines.append(f"SReT-T {mode}: sliced / unsliced = "
                     f"{img_s('models', 'sret_t', mode) / img_s('models', 'sret_t_unsliced', mode):.2f}x "
                     "(MAC ratio 1.23x)")
        lines.append(f"SReT-T {mode}: SReT-T / deit_tiny = "
                     f"{img_s('models', 'sret_t', mode) / img_s('models', 'deit_tiny_patch16_224', mode):.2f}x")
    return lines


def environment(args) -> dict:
    """Machine, library versions and settings of the run."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
            "vitblocks": vitblocks.__version__, "settings": vars(args)}
    if args.suite == "cuda":
        info["device"] = torch.cuda.get_device_name()
    return info


def write(results: list[Result], args, out: Path) -> None:
    """results.csv, results.md (with ratios and environment) and throughput.png."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    lines = ["| group | configuration | backend | mode | img/s | IQR % | peak MiB |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.group} | {r.name} | {r.backend} | {r.mode} | {r.img_s:.1f} | {r.iqr_pct:.1f} | {r.peak_mib:.1f} |"
              for r in results]
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {line}" for line in ratios(results))
    text += "\n\nEnvironment:\n\n```json\n" + json.dumps(environment(args), indent=2, default=str) + "\n```\n"
    (out / "results.md").write_text(text)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r.group == "models"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, mode in zip(axes, ("infer", "train")):
        chosen = [r for r in rows if r.mode == mode]
        ax.barh([r.name for r in chosen], [r.img_s for r in chosen])
        ax.set(title=f"{mode} throughput ({args.suite}, batch {args.batch_size}, {args.img_size}px)", xlabel="img/s")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--quick", action="store_true", help="few models, small inputs: checks the harness")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.suite == "cuda" and not torch.cuda.is_available():
        print("error: --suite cuda needs a CUDA device; use --suite cpu", file=sys.stderr)
        return 2
    if args.quick:
        args.img_size, args.warmup, args.repeats = 64, 1, 2
    args.batch_size = args.batch_size or (2 if args.quick else 8 if args.suite == "cpu" else 128)
    out = args.out or Path(__file__).parent / "results" / args.suite
    results = run_suite(args)
    write(results, args, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
