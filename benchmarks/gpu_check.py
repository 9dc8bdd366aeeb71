"""The whole GPU check in one command: environment, CUDA tests, training runs, benchmarks.

    bash benchmarks/gpu_check.sh OUTPUT_DIR            # on a GPU machine (see the script)
    python -m benchmarks.gpu_check OUTPUT_DIR --dry-run  # the same stages on CPU, tiny sizes

Stages run in order of importance, each in its own process under a time limit taken from
one overall budget, so a slow or failing stage costs only itself and the summary is always
written. Everything lands in OUTPUT_DIR: `environment.json`, `logs/<stage>.log`, the
benchmark reports (`cuda/`, `cuda-compiled/`), the training runs (`train-*/`), the
profiler tables (`profile.txt`) and `summary.md`, whose table of target ratios is also
printed last.
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


def stages(out: Path, dry_run: bool) -> list[Stage]:
    """The stages of the check, most important first.

    Args:
        out: Output folder.
        dry_run: CPU, tiny sizes, no torch.compile: checks the script itself.

    Returns:
        The stages.
    """
    train = ["-m", "vitblocks.train", "recipes/sret_pit.py", "--overwrite", "--set", "data.dataset=synthetic",
             "augment.repeated_aug=False", "log_every=1000000"]
    if dry_run:
        train += ["data.img_size=64", "data.synthetic_samples=16", "data.batch_size=8", "data.workers=0",
                  "epochs=1", "precision=fp32"]
        bench = ["--suite", "cpu", "--quick", "--groups", "vs_naive"]  # the full --quick run has its own test
        profile = ["--device", "cpu", "--batch-size", "2", "--img-size", "64", "--precision", "fp32", "--steps", "1"]
        compile_time = []
    else:  # 20 steps per epoch x 10 epochs = 200 steps of 256 images at 224 px
        train += ["data.img_size=224", "data.synthetic_samples=5120", "data.batch_size=256", "data.workers=6",
                  "epochs=10", "precision=bf16"]
        bench = ["--suite", "cuda", "--precision", "bf16"]
        profile = ["--batch-size", "256", "--precision", "bf16"]
        compile_time = ["--device", "cuda", "--img-size", "224", "--batch-size", "64", "--timeout", "120",
                        "--modes", "regional,model"]
    found = [
        # a dry run collects only the CUDA test file (the suite around it runs the rest)
        Stage("tests", ["-m", "pytest", "-m", "cuda", "tests/test_cuda.py" if dry_run else "tests", "-q",
                        "-p", "no:cacheprovider", "-o", "addopts=-ra"], 60 if dry_run else 150),
        Stage("bench", ["-m", "benchmarks.run", *bench, "--out", str(out / "cuda")], 150),
        Stage("train-eager", [*train, f"output_dir={out / 'train-eager'}"], 60),
        Stage("profile", ["-m", "benchmarks.profile_step", "sret_t", "deit_tiny_patch16_224", *profile,
                          "--out", str(out / "profile.txt")], 45),
        # Before bench-compiled: its SReT-T training graph is this one's, so inductor's cache serves it.
        Stage("train-compiled", [*train, "model.compile=True", *([] if dry_run else ["epochs=5"]),
                                 f"output_dir={out / 'train-compiled'}"], 150),
        Stage("bench-compiled", ["-m", "benchmarks.run", *bench, "--compile", "--groups", "vs_naive",
                                 "--out", str(out / "cuda-compiled")], 200),
        Stage("profile-compiled", ["-m", "benchmarks.profile_step", "sret_t", "deit_tiny_patch16_224", *profile,
                                   "--compile", "--out", str(out / "profile-compiled.txt")], 90),
        Stage("train-regional", [*train, "model.compile=regional", *([] if dry_run else ["epochs=5"]),
                                 f"output_dir={out / 'train-regional'}"], 150),
        Stage("compile-time", ["-m", "benchmarks.compile_time", *compile_time, "--out", str(out / "compile-time")],
              300),
    ]
    if dry_run:
        for stage in found:
            if "compile" in stage.name or "regional" in stage.name:
                stage.status = "skipped: no torch.compile in a dry run"
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

        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count)
        if XFORMERS_INSTALLED:
            info["xformers_kernels"] = {str(dtype): xformers_kernel_problem("cuda:0", dtype, 32) or "ok"
                                        for dtype in (torch.float16, torch.bfloat16, torch.float32)}
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


def summary(stage_list: list[Stage], env: dict, out: Path) -> str:
    """The closing report: environment, stage outcomes, training speeds and target ratios."""
    lines = ["# GPU check", "", f"device: {env.get('gpu', 'no GPU (dry run)' if env['dry_run'] else 'no GPU')}; "
             f"torch {env['torch']} (CUDA {env['cuda']}), timm {env['timm']}, xformers {env['xformers']}"]
    if "xformers_kernels" in env:
        lines.append(f"xformers kernels: {env['xformers_kernels']}")
    if "backends" in env:
        lines.append(f"backends available: {env['backends']}")
    lines += ["", "| stage | status | seconds |", "|---|---|---:|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in stage_list]
    tests = out / "logs" / "tests.log"
    if tests.exists():
        closing = [line for line in tests.read_text(errors="replace").splitlines() if " passed" in line
                   or " failed" in line or " skipped" in line or "error" in line.lower()]
        lines += ["", f"tests: {closing[-1].strip('= ') if closing else 'no result line'}"]
    lines += ["", "training (python -m vitblocks.train recipes/sret_pit.py on synthetic data):",
              f"- eager: {training_throughput(out / 'train-eager')}",
              f"- torch.compile: {training_throughput(out / 'train-compiled')}",
              f"- compile_regions: {training_throughput(out / 'train-regional')}"]
    table = out / "compile-time" / "compile_time.md"
    if table.exists():
        lines += ["", table.read_text().strip()]
    lines += ["", "target ratios:"]
    lines += [f"- {line}" for line in ratio_lines(out / "cuda") + ratio_lines(out / "cuda-compiled")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 1 if any stage failed or timed out."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for logs, reports and the summary")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no compile: checks the script")
    parser.add_argument("--budget-s", type=float, default=550.0, help="overall time limit of all stages")
    parser.add_argument("--only", default="", help="comma-separated stage names to run (default: all)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
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
