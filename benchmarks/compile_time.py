"""Compile time against loop count: `torch.compile(model)` against `compile_regions(model)`.

    python -m benchmarks.compile_time --out benchmarks/results/compile-cpu     # CPU, 64 px, batch 2
    python -m benchmarks.compile_time --device cuda --img-size 224 --batch-size 64

For SReT-T with 2, 10 and 100 loops per block (20, 100 and 1000 block applications, one
shared mixing layer per block) each case runs in a fresh process with an empty inductor
cache: the first training step (forward and backward, compilation included), the median
of the next three, and their difference, the compile time. A case that runs past
`--timeout` is reported as such. Writes `compile_time.csv` and `compile_time.md`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("model", "regional")
FIELDS = ("mode", "loops", "applications", "first_step_s", "step_s", "compile_s", "graphs", "status")


def run_case(mode: str, loops: int, device: str, img_size: int, batch: int, backend: str = "inductor") -> dict:
    """One case, in this process: build, compile, time the first and later training steps."""
    import timm
    import torch
    from torch._dynamo.utils import counters

    import vitblocks
    from benchmarks.measure import time_once
    from benchmarks.run import _forward_backward_fn

    torch.manual_seed(0)
    model = timm.create_model("sret_t", img_size=img_size, num_classes=10, loops=loops, mix="shared").to(device)
    model = (torch.compile(model, backend=backend) if mode == "model"
             else vitblocks.compile_regions(model, backend=backend))
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    step = _forward_backward_fn(model, images, "fp32")
    first = time_once(step, images.device)
    later = sorted(time_once(step, images.device) for _ in range(3))[1]
    return {"mode": mode, "loops": loops, "applications": 10 * loops, "first_step_s": round(first, 2),
            "step_s": round(later, 3), "compile_s": round(first - later, 2),
            "graphs": counters["stats"]["unique_graphs"], "status": "ok"}


def measure(mode: str, loops: int, args) -> dict:
    """Run one case in a fresh process with an empty inductor cache, under the time limit."""
    command = [sys.executable, "-m", "benchmarks.compile_time", "--case", mode, str(loops), "--device", args.device,
               "--img-size", str(args.img_size), "--batch-size", str(args.batch_size), "--backend", args.backend]
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONPATH=str(ROOT))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT, env=env)
        except subprocess.TimeoutExpired:
            return {"mode": mode, "loops": loops, "applications": 10 * loops, "status": f"> {args.timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"mode": mode, "loops": loops, "applications": 10 * loops,
                "status": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"}
    return json.loads(lines[-1])


def markdown(rows: list[dict], title: str) -> str:
    """The rows as a markdown table."""
    lines = [f"Compile time, {title}", "",
             "| compiled | loops per block | block applications | first step s | later step s | compile s | graphs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {r['mode']} | {r['loops']} | {r['applications']} | {r['first_step_s']} | {r['step_s']} "
                         f"| {r['compile_s']} | {r['graphs']} |")
        else:
            lines.append(f"| {r['mode']} | {r['loops']} | {r['applications']} | {r['status']} | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--loops", default="2,10,100", help="comma-separated loops per block")
    parser.add_argument("--modes", default=",".join(MODES), help="model, regional or both")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: trace only)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per case")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile")
    parser.add_argument("--case", nargs=2, metavar=("MODE", "LOOPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.device, args.img_size, args.batch_size,
                                  args.backend)))
        return 0
    rows: list[dict] = []
    for loops in (int(n) for n in args.loops.split(",")):
        for mode in args.modes.split(","):
            rows.append(measure(mode, loops, args))
            print(rows[-1], flush=True)
            text = write(rows, args)  # after every case, so a run stopped from outside keeps what it measured
    print(text)
    return 0


def write(rows: list[dict], args) -> str:
    """Write compile_time.csv and compile_time.md; return the markdown."""
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "compile_time.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
    text = markdown(rows, f"SReT-T training step on {args.device}, {args.img_size} px, batch {args.batch_size}")
    (args.out / "compile_time.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
