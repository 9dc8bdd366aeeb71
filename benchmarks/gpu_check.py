"""The whole GPU check in one command: environment, kernels, steps, training runs, tests.

    bash benchmarks/gpu_check.sh OUTPUT_DIR            # on a GPU machine (see the script)
    python -m benchmarks.gpu_check OUTPUT_DIR --dry-run  # the same stages on CPU, tiny sizes

Stages run in order of importance, the targets' measurements and the tests first — the
environment (with whether xformers' kernels load), compiled steps and CUDA graphs of
sret_t and deit_tiny, inference, SReT-S's FLOP utilisation (`benchmarks.gpu_step`), the
CUDA tests, the trainer end to end, the profiler table; then what the 2026-12-04 run
measured (eager steps, the attention kernels at every sliced shape, pooling, routing)
and the longer stages (the official-computation and recursion-memory rows of
`benchmarks.run`, JPEG decoding in the trainer) — each in its own process under a time limit
taken from one overall budget, so a slow or failing stage costs only itself and the
summary is always written. Measurements land in OUTPUT_DIR/rows.jsonl as they are made;
with them `environment.json`, `logs/<stage>.log`, the benchmark report (`cuda/`), the
training runs (`train-*/`), the profiler table (`profile.txt`) and `summary.md`, whose
table of target ratios is also printed last.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Stage:
    """One step of the check.

    Attributes:
        name: Short name; its log is `logs/<name>.log`.
        command: Arguments after `python`.
        budget_s: Longest it may run (less if the overall budget runs short).
        status: "ok", "failed (exit N)", "timed out", "skipped: why".
        seconds: Wall time it took.
    """

    name: str
    command: list[str]
    budget_s: float
    status: str = "not run"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


DRY_RUN_SLACK = 5
"""How many times a stage's GPU time limit a dry run allows it (at least 600 s): a loaded CPU must not fail it."""


def stages(out: Path, dry_run: bool) -> list[Stage]:
    """The stages of the check, most important first.

    Args:
        out: Output folder.
        dry_run: CPU, tiny sizes, tracing-only compilation: checks the script itself.

    Returns:
        The stages.
    """
    step = ["-m", "benchmarks.gpu_step"]
    train = ["-m", "vitblocks.train", "recipes/sret_pit.py", "--overwrite", "--set", "data.dataset=synthetic",
             "augment.repeated_aug=False", "log_every=20"]
    jpeg_train = ["-m", "vitblocks.train", "recipes/sret_pit.py", "--overwrite", "--set", "data.dataset=imagefolder",
                  f"data.root={out / 'jpegs'}", "data.num_classes=10", "augment.repeated_aug=False",
                  "augment.auto_augment=None", "augment.color_jitter=0", "log_every=20", "data.img_size=224",
                  "data.batch_size=256", "epochs=3", "precision=bf16"]
    if dry_run:
        train += ["data.img_size=64", "data.synthetic_samples=16", "data.batch_size=8", "data.workers=0",
                  "epochs=1", "precision=fp32"]
        profile = ["--device", "cpu", "--batch-size", "2", "--img-size", "64", "--precision", "fp32", "--steps", "1"]
        # the step stages' code at tiny sizes, in one process; no benchmarks.run group (those have tests of their own)
        measured = [Stage("steps", [*step, "all", str(out), "--dry-run"], 300)]  # ~1 min alone, 2-4 under a loaded CPU
        measured_before = []
    else:  # 20 steps per epoch x 5 epochs = 100 steps of 256 images at 224 px
        train += ["data.img_size=224", "data.synthetic_samples=5120", "data.batch_size=256", "data.workers=6",
                  "epochs=5", "precision=bf16"]
        profile = ["--batch-size", "256", "--precision", "bf16"]
        bench = ["--suite", "cuda", "--precision", "bf16", "--groups", "vs_naive,recursion"]
        # the targets' measurements first (the 2026-12-04 run measured attention, pool and
        # dynamic, and its budget ran out before the trainer and the tests)
        measured = [
            Stage("compiled-sret", [*step, "compiled-sret", str(out)], 130),
            Stage("compiled-deit", [*step, "compiled-deit", str(out)], 80),
            Stage("inference", [*step, "inference", str(out)], 60),
            Stage("mfu", [*step, "mfu", str(out)], 60),
        ]
        measured_before = [
            Stage("eager", [*step, "eager", str(out)], 70),
            Stage("attention", [*step, "attention", str(out)], 50),
            Stage("pool", [*step, "pool", str(out)], 25),
            Stage("dynamic", [*step, "dynamic", str(out)], 45),
            Stage("bench", ["-m", "benchmarks.run", *bench, "--out", str(out / "cuda")], 90),
        ]
    found = [
        *measured,
        # a dry run collects only the CUDA test file (the suite around it runs the rest)
        Stage("tests", ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py" if dry_run else "tests", "-q",
                        "-p", "no:cacheprovider", "-o", "addopts=-ra"], 60 if dry_run else 90),
        Stage("train-eager", [*train, f"output_dir={out / 'train-eager'}"], 60),
        Stage("train-graphs", [*train, "model.compile=graphs", f"output_dir={out / 'train-graphs'}"], 90),
        Stage("profile", ["-m", "benchmarks.profile_step", "sret_t", "deit_tiny_patch16_224", *profile,
                          "--out", str(out / "profile.txt")], 45),
        *measured_before,
        # an ImageFolder of JPEGs made here, trained with each decode (crop and flip only, so both run the same)
        Stage("make-jpegs", ["-m", "benchmarks.feed", "--make-jpegs", str(out / "jpegs"), "--count", "6144"], 40),
        *(Stage(f"train-jpeg-{decode}", [*jpeg_train, f"data.decode={decode}", f"data.workers={workers}",
                                         f"output_dir={out / f'train-jpeg-{decode}'}"], 60)
          for decode, workers in (("cpu", 15), ("gpu", 4))),
    ]
    if dry_run:
        for stage in found:
            # the dry run checks the stages' code, not their speed: limits that hold on a loaded CPU too
            stage.budget_s = max(stage.budget_s * DRY_RUN_SLACK, 600)
            if stage.name == "train-graphs":
                stage.status = "skipped: CUDA graphs need a GPU"
            if "jpeg" in stage.name:
                stage.status = "skipped: the decode paths have CPU tests of their own (tests/test_feed.py)"
    return found


def environment(dry_run: bool) -> dict:
    """Machine and library versions, and whether xformers' kernels run here."""
    import einops
    import timm
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "timm": timm.__version__, "einops": einops.__version__, "dry_run": dry_run,
            "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    try:
        import xformers

        info["xformers"] = xformers.__version__
    except ImportError as error:
        info["xformers"] = f"not importable: {error}"
    if torch.cuda.is_available():
        from vitblocks.attention import available_backends
        from vitblocks.attention.backends import XFORMERS_INSTALLED, xformers_kernel_problem
        from vitblocks.attention.xformers_runtime import preload_cuda12_runtime

        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        if XFORMERS_INSTALLED:
            info["xformers_kernels"] = {str(dtype): xformers_kernel_problem("cuda:0", dtype, 32) or "ok"
                                        for dtype in (torch.float16, torch.bfloat16, torch.float32)}
            info["cuda12_runtime"] = preload_cuda12_runtime() or "not loaded (torch provides it, or not installed)"
        info["backends"] = {str(dtype): available_backends("cuda", dtype)
                            for dtype in (torch.float16, torch.bfloat16, torch.float32)}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as error:
            info["nvidia_smi"] = f"unavailable: {error}"
    return info


def run_stage(stage: Stage, out: Path, deadline: float, python: str) -> None:
    """Run one stage under its budget, logging to `logs/<name>.log`."""
    if stage.status.startswith("skipped"):
        return
    limit = min(stage.budget_s, deadline - time.monotonic())
    if limit < 15:
        stage.status = "skipped: overall budget spent"
        return
    log = out / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {stage.name} (up to {limit:.0f} s): python {' '.join(stage.command)}", flush=True)
    start = time.monotonic()
    with log.open("w") as handle:
        try:
            process = subprocess.run([python, *stage.command], cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                     timeout=limit, env=dict(os.environ, PYTHONUNBUFFERED="1"))
            stage.status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
        except subprocess.TimeoutExpired:
            stage.status = "timed out"
    stage.seconds = time.monotonic() - start
    tail = log.read_text(errors="replace").strip().splitlines()[-4:]
    print(f"   {stage.status} in {stage.seconds:.0f} s; log ends:", *(f"   | {line[:200]}" for line in tail),
          sep="\n", flush=True)


def training_throughput(run: Path) -> str:
    """Median training images/s over a run's epochs after the first (which warms up)."""
    try:
        rows = list(csv.DictReader((run / "metrics.csv").open()))
    except OSError:
        return "no metrics"
    speeds = [float(r["train_img_s"]) for r in rows[1:] or rows]
    last = rows[-1] if rows else {}
    return (f"{statistics.median(speeds):.0f} img/s (median of epochs 2-{len(rows)}), "
            f"final train loss {float(last.get('train_loss', 'nan')):.3f}, val top-1 {last.get('val_top1', '?')}")


def ratio_lines(folder: Path) -> list[str]:
    """The ratio lines of a benchmark report."""
    try:
        text = (folder / "results.md").read_text()
    except OSError:
        return []
    return [line[2:] for line in text.splitlines() if line.startswith("- ") and " = " in line]


def read_rows(out: Path) -> list[dict]:
    """The measurement rows the `benchmarks.gpu_step` stages wrote."""
    try:
        return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines() if line.strip()]
    except OSError:
        return []


def target_lines(rows: list[dict]) -> list[str]:
    """The step issue's target ratios, each from two rows of this run (missing rows: no line)."""
    best: dict[str, float] = {}
    for row in rows:
        if "img_s" in row and "name" in row:
            best[row["name"]] = max(best.get(row["name"], 0.0), row["img_s"])
    lines = []

    def line(label: str, numerator: str, denominator: str, target: str) -> None:
        if best.get(numerator) and best.get(denominator):
            lines.append(f"{label} = {best[numerator] / best[denominator]:.2f}x (target {target})")

    line("SReT-T training / deit_tiny, both eager (fused AdamW)", "sret_t fused",
         "deit_tiny_patch16_224 fused", ">= 1.0x")
    line("SReT-T training / deit_tiny, both under CUDA graphs", "sret_t cuda graphs",
         "deit_tiny_patch16_224 cuda graphs", ">= 0.8x")
    line("SReT-T training / deit_tiny, both torch.compile", "sret_t torch.compile",
         "deit_tiny_patch16_224 torch.compile", ">= 0.8x")
    for treatment in ("autocast eager", "autocast compiled", "bf16 weights eager", "bf16 weights compiled"):
        line(f"SReT-T inference / deit_tiny, {treatment}", f"sret_t {treatment}",
             f"deit_tiny_patch16_224 {treatment}", ">= 1.0x")
    line("SReT-T training: sliced / unsliced", "sret_t fused", "sret_t_unsliced fused", ">= 1.10x")
    for pool in ("64->128", "128->256"):
        line(f"pooling {pool}, forward + backward: depthwise on repeated channels / grouped",
             f"pool {pool} repeated + depthwise", f"pool {pool} grouped", "> 1.0x: make it ConvPool's default")
    for model in ("sret_t", "deit_tiny 2 loops"):
        for kind in ("expert 0.5", "token"):
            for mode in ("training", "inference"):
                line(f"{model} {kind} routing / static, bf16 {mode}", f"{model} {kind} {mode}",
                     f"{model} static {mode}", ">= 1.0x")
    mfu = [row for row in rows if "mfu_percent" in row]
    if mfu:
        top = max(mfu, key=lambda row: row["mfu_percent"])
        lines.append(f"SReT-S model FLOP utilisation = {top['mfu_percent']:.1f}% ({top['name']}, against a "
                     f"{top['matmul_tflops']:.0f} TFLOP/s bf16 matmul) (target >= 20%)")
    for row in rows:
        if "check" in row:
            lines.append(f"check {row['name']} {row['check']}: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                if k not in ("stage", "device", "name", "check")))
    return lines


def summary(stage_list: list[Stage], env: dict, out: Path) -> str:
    """The closing report: environment, stage outcomes, training speeds and target ratios."""
    lines = ["# GPU check", "", f"device: {env.get('gpu', 'no GPU (dry run)' if env['dry_run'] else 'no GPU')}; "
             f"torch {env['torch']} (CUDA {env['cuda']}), timm {env['timm']}, xformers {env['xformers']}"]
    for key in ("nvidia_smi", "cuda12_runtime", "xformers_kernels", "backends"):
        if key in env:
            lines.append(f"{key.replace('_', ' ')}: {env[key]}")
    lines += ["", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in stage_list]
    tests = out / "logs" / "tests.log"
    if tests.exists():
        closing = [line for line in tests.read_text(errors="replace").splitlines() if " passed" in line
                   or " failed" in line or " skipped" in line or "error" in line.lower()]
        lines += ["", f"tests: {closing[-1].strip('= ') if closing else 'no result line'}"]
    lines += ["", "training (python -m vitblocks.train recipes/sret_pit.py on synthetic data):",
              f"- eager: {training_throughput(out / 'train-eager')}",
              f"- model.compile=graphs: {training_throughput(out / 'train-graphs')}",
              "training on an ImageFolder of 320x240 JPEGs made here (crop and flip, 224 px):",
              f"- data.decode=cpu (15 workers): {training_throughput(out / 'train-jpeg-cpu')}",
              f"- data.decode=gpu (4 workers): {training_throughput(out / 'train-jpeg-gpu')}"]
    lines += ["", "target ratios:"]
    lines += [f"- {line}" for line in target_lines(read_rows(out)) + ratio_lines(out / "cuda")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 1 if any stage failed or timed out."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for logs, reports and the summary")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no compile: checks the script")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="overall time limit of all stages (default 450 s; a dry run, 3600 s)")
    parser.add_argument("--only", default="", help="comma-separated stage names to run (default: all)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + (args.budget_s if args.budget_s is not None else 3600.0 if args.dry_run else 450.0)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    env = environment(args.dry_run)
    (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    if env["cuda_available"]:
        (out / "logs").mkdir(exist_ok=True)
        with (out / "logs" / "xformers-info.log").open("w") as handle:
            try:
                subprocess.run([sys.executable, "-m", "xformers.info"], stdout=handle, stderr=subprocess.STDOUT,
                               timeout=60, cwd=ROOT)
            except subprocess.TimeoutExpired:
                handle.write("timed out\n")
    print(json.dumps(env, indent=2), flush=True)
    stage_list = stages(out, args.dry_run)
    chosen = {name.strip() for name in args.only.split(",") if name.strip()}
    for stage in stage_list:
        if chosen and stage.name not in chosen:
            stage.status = "skipped: not chosen"
        run_stage(stage, out, deadline, sys.executable)
    text = summary(stage_list, env, out)
    (out / "summary.md").write_text(text)
    print(text, flush=True)
    return 1 if any(s.status.startswith(("failed", "timed out")) for s in stage_list) else 0


if __name__ == "__main__":
    sys.exit(main())
