"""Throughput and memory of SReT against timm baselines, backends and recursion depths.

    python -m benchmarks.run --suite cpu                 # writes benchmarks/results/cpu/
    python -m benchmarks.run --suite cuda --precision bf16 --compile   # batch 256 train, 1024 infer
    python -m benchmarks.run --suite cpu --compile       # adds torch.compile and compile_regions rows (minutes)
    python -m benchmarks.run --suite cpu --quick         # minutes: checks the harness; results/cpu-quick/

Every number is measured in this one process, with warm-up, several repetitions and the
median / IQR; ratios compare rows of the same run. The naive baseline is SReT-T as the
official code computes it (`benchmarks.naive_sret`): explicit matmul-softmax attention
on 6-D reshapes, index-gather permutations redrawn on every call, and the official
channels-first stem, with the same weights as the optimized `sret_t`.
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import sys
from pathlib import Path

import timm
import torch

import vitblocks
from benchmarks.attention_shapes import measure_attention_shapes
from benchmarks.measure import peak_bytes, time_interleaved
from benchmarks.naive_sret import NaiveSReT
from benchmarks.report import write_report
from benchmarks.result import Result
from vitblocks.attention import attention_backend, available_backends
from vitblocks.models.official import export_official_state_dict
from vitblocks.summary import summarize
from vitblocks.train.run.precision import autocast_for

NAIVE = "sret_t naive (official computation)"
COMPILED = "sret_t (torch.compile)"
REGIONAL = "sret_t (compile_regions)"
DEIT = "deit_tiny_patch16_224"
DEIT_COMPILED = "deit_tiny_patch16_224 (torch.compile)"
PAIRED = "vs_naive"
GROUPS = ("models", "vs_naive", "backends", "attention", "recursion", "reference")
MATMUL = "matmul TFLOP/s (8192^3 on GPU)"
DROP_PATH = 0.0
"""Stochastic depth of every benchmarked model: the same for all, and the naive baseline has none."""
SRET_S_FLOPS = "sret_s training GFLOP per image (6 x MACs)"


def _autocast(device, precision):
    return autocast_for(precision, device.type)


def _step_fn(model, images, train, precision, fused=False):
    if not train:
        def infer():
            with torch.no_grad(), _autocast(images.device, precision):
                model(images)
        return infer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))

    def train_step():
        if images.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graph trees (no-op otherwise)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(images.device, precision):
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
    return train_step


def _forward_backward_fn(model, images, precision):
    def forward_backward():
        model.zero_grad(set_to_none=True)
        with _autocast(images.device, precision):
            loss = model(images).float().logsumexp(-1).mean()
        loss.backward()
    return forward_backward


def measure_together(group, entries, images, train, args, memory=True) -> list[Result]:
    """Throughput (images/s) of inference or a training step, and its peak memory, for
    (name, model, backend) entries timed in turns, so that their ratios are not skewed
    by drift of the machine.

    The memory of a training step is that of forward + backward (activations and
    gradients); the optimizer's own buffers would otherwise hide the activations.
    """
    fns, peaks = {}, {}
    for name, model, backend in entries:
        model = model.to(images.device).train(train)
        with attention_backend(backend):
            step = _step_fn(model, images, train, args.precision)
            work = _forward_backward_fn(model, images, args.precision) if train else step
            peaks[name] = peak_bytes(work, images.device) if memory else 0
        fns[name] = _with_backend(step, backend)
    timings = time_interleaved(fns, images.device, args.warmup, args.repeats)
    return [Result(group, name, backend, "train" if train else "infer", images.shape[0] / timings[name].median,
                   100 * timings[name].iqr / timings[name].median, peaks[name] / 2**20)
            for name, _, backend in entries]


def measure(group, name, model, images, backend, train, args, memory=True) -> Result:
    """`measure_together` for one model."""
    return measure_together(group, [(name, model, backend)], images, train, args, memory)[0]


def _with_backend(fn, backend):
    def run():
        with attention_backend(backend):
            fn()
    return run


def naive_sret_t(model: torch.nn.Module, img_size: int) -> NaiveSReT:
    """The naive baseline, holding the same weights as the vitblocks `sret_t` `model`."""
    naive = NaiveSReT(image_size=img_size, num_classes=model.num_classes)
    naive.load_state_dict(export_official_state_dict(model))
    return naive


def reference_matmul(device: torch.device, dtype: torch.dtype, args) -> Result:
    """The machine's matrix-product rate in this run's precision: the ceiling that model
    FLOP utilisation is measured against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = time_interleaved({"matmul": lambda: a @ b}, device, args.warmup, max(args.repeats, 5))["matmul"]
    return Result("reference", MATMUL, "-", "infer", 2 * n**3 / timing.median / 1e12,
                  100 * timing.iqr / timing.median, 0.0)


def sret_s_training_flops(img_size: int) -> Result:
    """FLOPs of one SReT-S training image (forward + backward = 3 forwards), counted."""
    macs = summarize(timm.create_model("sret_s", img_size=img_size), img_size)[-1].macs
    return Result("reference", SRET_S_FLOPS, "-", "train", 6 * macs / 1e9, 0.0, 0.0)


def run_suite(args) -> list[Result]:
    """Every benchmark group, at the chosen size."""
    device = torch.device("cuda" if args.suite == "cuda" else "cpu")
    size = args.img_size
    batches = {True: torch.randn(args.batch_size, 3, size, size, device=device),
               False: torch.randn(args.infer_batch_size, 3, size, size, device=device)}
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    results = [reference_matmul(device, dtype, args), sret_s_training_flops(size)] if "reference" in args.groups else []
    fast = "auto"
    models = ["sret_t", "sret_t_unsliced", "sret_lt", "sret_lt_unsliced", "sret_s", "sret_s_unsliced",
              "deit_tiny_patch16_224", "deit_small_patch16_224", "pit_ti_224"]
    if args.quick:
        models = ["sret_t", "sret_t_unsliced", "deit_tiny_patch16_224"]
    for train in (False, True):
        images = batches[train]
        for name in models if "models" in args.groups else ():
            model = timm.create_model(name, img_size=size, drop_path_rate=DROP_PATH)
            results.append(measure("models", name, model, images, fast, train, args))
        sret = timm.create_model("sret_t", img_size=size, drop_path_rate=DROP_PATH)
        for backend in available_backends(device, dtype) if "backends" in args.groups else ():
            results.append(measure("backends", "sret_t", sret, images, backend, train, args, memory=False))
        if "attention" in args.groups:
            results += measure_attention_shapes(images.shape[0], size, device, dtype, train, args)
        if "vs_naive" not in args.groups:
            continue
        deit = timm.create_model(DEIT, img_size=size, drop_path_rate=DROP_PATH)
        entries = [(NAIVE, naive_sret_t(sret, size), "math"), ("sret_t", sret, fast), (DEIT, deit, fast)]
        if args.compile:
            entries += [(COMPILED, torch.compile(copy.deepcopy(sret)), fast),
                        (REGIONAL, vitblocks.compile_regions(copy.deepcopy(sret)), fast),
                        (DEIT_COMPILED, torch.compile(copy.deepcopy(deit)), fast)]
        results += measure_together(PAIRED, entries, images, train, args)
    if "recursion" not in args.groups:
        return results
    # Deep recursion at a small input, so 1000 block applications take seconds per step.
    small_size = 32 if args.quick else 64
    small = torch.randn(2 if args.quick else 4, 3, small_size, small_size, device=device)
    for loops in ((10, 20, 100) if args.quick else (10, 20, 100, 1000)):
        for mode in (False, "sqrt"):
            model = timm.create_model("sret_t", img_size=small_size, num_classes=10, loops=loops // 10,
                                      mix="shared", grad_checkpointing=mode)
            label = f"{loops} applications, checkpointing={mode or 'off'}"
            results.append(measure("recursion", label, model, small, fast, True, args))
    return results


@functools.cache
def mac_ratio(name: str, img_size: int = 224) -> str:
    """MACs of a model's unsliced variant over its own, as the ratios table prints it.

    Args:
        name: A sliced SReT variant, e.g. "sret_t".
        img_size: Input size the MACs are counted at.

    Returns:
        E.g. "1.366/1.112 = 1.23x".
    """
    sliced, unsliced = (summarize(timm.create_model(n, img_size=img_size), img_size)[-1].macs / 1e9
                        for n in (name, f"{name}_unsliced"))
    return f"{unsliced:.3f}/{sliced:.3f} = {unsliced / sliced:.2f}x"


def default_out(suite: str, quick: bool) -> Path:
    """Where a run writes its report by default.

    Args:
        suite: "cpu" or "cuda".
        quick: A `--quick` harness check, which gets its own folder so that it never
            overwrites a full run's report.

    Returns:
        `benchmarks/results/<suite>` or `benchmarks/results/<suite>-quick`.
    """
    return Path(__file__).parent / "results" / (suite + ("-quick" if quick else ""))


QUICK_NOTE = ("HARNESS CHECK (--quick): tiny inputs, 1 warm-up and 2 repetitions; these ratios say nothing "
              "about speed. Run without --quick for figures.")


def ratios(results: list[Result]) -> list[str]:
    """The target ratios, each computed from two rows of this run.

    Args:
        results: Every row of the run.

    Returns:
        One line per ratio whose two rows were measured.
    """
    rows = {(r.group, r.name, r.mode, r.backend): r for r in results}

    def img_s(group, name, mode, backend="auto"):
        row = rows.get((group, name, mode, backend))
        return row.img_s if row else None

    def line(label, numerator, denominator, note=""):
        if numerator and denominator:
            lines.append(f"{label} = {numerator / denominator:.2f}x{note}")

    lines: list[str] = []
    for mode in ("train", "infer"):
        ours = img_s("models", "sret_t", mode)
        naive = img_s(PAIRED, NAIVE, mode, "math")
        line(f"SReT-T {mode}: optimized / naive", img_s(PAIRED, "sret_t", mode), naive, " (target 1.5x)")
        line(f"SReT-T {mode}: torch.compile / naive", img_s(PAIRED, COMPILED, mode), naive, " (target 1.5x)")
        line(f"SReT-T {mode}: compile_regions / naive", img_s(PAIRED, REGIONAL, mode), naive)
        for name in ("sret_t", "sret_lt", "sret_s"):
            sliced, unsliced = img_s("models", name, mode), img_s("models", f"{name}_unsliced", mode)
            if sliced and unsliced:
                line(f"{name} {mode}: sliced / unsliced", sliced, unsliced, f" (MAC ratio {mac_ratio(name)})")
        line(f"SReT-T {mode}: SReT-T / deit_tiny", ours, img_s("models", "deit_tiny_patch16_224", mode))
        line(f"SReT-T {mode}: SReT-T / deit_tiny, timed in turns", img_s(PAIRED, "sret_t", mode),
             img_s(PAIRED, DEIT, mode), " (target 1.0x)")
        line(f"SReT-T {mode}: compiled SReT-T / compiled deit_tiny", img_s(PAIRED, COMPILED, mode),
             img_s(PAIRED, DEIT_COMPILED, mode), " (target 1.0x)")
        for backend in ("sdpa", "xformers"):
            line(f"SReT-T {mode}: {backend} / math backend", img_s("backends", "sret_t", mode, backend),
                 img_s("backends", "sret_t", mode, "math"))
    matmul, flops = img_s("reference", MATMUL, "infer", "-"), img_s("reference", SRET_S_FLOPS, "train", "-")
    sret_s = img_s("models", "sret_s", "train")
    if matmul and flops and sret_s:
        lines.append(f"SReT-S training model FLOP utilisation = {100 * sret_s * flops / 1e3 / matmul:.1f}% "
                     f"of the measured matmul rate {matmul:.1f} TFLOP/s (target 35%)")
    memory = {r.name: r.peak_mib for r in results if r.group == "recursion"}
    for loops in (10, 100, 1000):
        off, on = (memory.get(f"{loops} applications, checkpointing={mode}") for mode in ("off", "sqrt"))
        if off and on:
            lines.append(f"{loops} applications: training memory without / with checkpointing = {off / on:.1f}x")
    deep, shallow = (memory.get(f"{n} applications, checkpointing=sqrt") for n in (1000, 20))
    if deep and shallow:
        lines.append(f"checkpointing=sqrt: training memory of 1000 / 20 applications = {deep / shallow:.2f}x "
                     "(target 1.5x)")
    return lines


def cpu_name() -> str:
    """The CPU model as the operating system names it."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def environment(args) -> dict:
    """Machine, library versions and settings of the run."""
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__,
            "vitblocks": vitblocks.__version__, "settings": vars(args)}
    if args.suite == "cuda":
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    backends_bf16=available_backends("cuda", torch.bfloat16))
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError:
        info["xformers"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (CUDA default 256)")
    parser.add_argument("--infer-batch-size", type=int, default=None, help="inference batch (CUDA default 1024)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile and compile_regions rows for sret_t and deit_tiny (minutes)")
    parser.add_argument("--quick", action="store_true", help="few models, small inputs: checks the harness")
    parser.add_argument("--groups", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of {', '.join(GROUPS)}")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.groups = tuple(g.strip() for g in args.groups.split(",") if g.strip())
    unknown = sorted(set(args.groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    if args.suite == "cuda" and not torch.cuda.is_available():
        print("error: --suite cuda needs a CUDA device; use --suite cpu", file=sys.stderr)
        return 2
    if args.quick:
        args.img_size, args.warmup, args.repeats = 64, 1, 2
    args.batch_size = args.batch_size or (2 if args.quick else 8 if args.suite == "cpu" else 256)
    args.infer_batch_size = args.infer_batch_size or (args.batch_size if args.suite == "cpu" else 1024)
    out = args.out or default_out(args.suite, args.quick)
    results = run_suite(args)
    batch = (f"batch {args.batch_size}" if args.batch_size == args.infer_batch_size
             else f"batch {args.batch_size} train / {args.infer_batch_size} infer")
    where = torch.cuda.get_device_name() if args.suite == "cuda" else args.suite
    lines = ratios(results)
    if args.quick:
        lines = [QUICK_NOTE] + lines
    write_report(results, lines, environment(args), out, f"{where}, {args.precision}, {batch}, {args.img_size}px")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
