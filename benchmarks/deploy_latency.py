"""CPU inference latency of each deployment form of a model, against eager PyTorch and plain timm baselines.

    python -m benchmarks.deploy_latency                       # four models, batch 1 and 8 (about 15 minutes)
    python -m benchmarks.deploy_latency --models sret_t --batch-sizes 1 --repeats 10

Every form is built from one model in eval mode (random weights at the model's default
input size; a form's speed does not depend on the values): eager, `torch.export` (the
exported program's module), the three artifacts `python -m vitblocks.export` writes
(AOTInductor fp32 `.pt2` with weight freezing, ONNX in onnxruntime, and static int8
through torchao's PT2E quantizer for x86 compiled the same way, calibrated here on
random images), TorchScript `trace`, and the legacy int8 dynamic quantization of the
linear layers (`torch.ao.quantization.quantize_dynamic`). Each form is built once and
serves every batch size timed (dynamic batch). The forms are timed in turns in one
process (`time_interleaved`), so the ratios against eager are what to compare; the
largest difference of each form's logits from eager's is reported too.

The models: SReT-T and the sliced recursive DeiT-Tiny beside plain timm
`deit_tiny_patch16_224` and `pit_ti_224`, so the table shows what recursion and slicing
cost or save once deployed. `--profile` adds the eager operator profile of SReT-T and
DeiT-Tiny at batch 1 (what costs the difference between them).

Writes `deploy_latency.md` (the table docs/deploy.md shows), `deploy_latency.json` and,
with `--profile`, `deploy_latency_profile.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import vitblocks  # noqa: F401 - registers the models
from benchmarks.measure import time_interleaved
from vitblocks.deploy.formats import export_model, load_artifact

ROOT = Path(__file__).resolve().parents[1]
MODELS = "sret_t,deit_tiny_rec_sliced_patch16_224,deit_tiny_patch16_224,pit_ti_224"
FLOAT_FORMS = ("eager", "torch.export", "AOTInductor fp32 (.pt2)", "TorchScript trace", "ONNX (onnxruntime)")
INT8_STATIC = "int8 static, torchao (.pt2)"
INT8_DYNAMIC = "int8 dynamic, legacy quantize_dynamic"


def deployment_forms(model: torch.nn.Module, example: torch.Tensor, workdir: Path,
                     calibration_batches: int = 4) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each deployment form of `model` as a function of a batch of images.

    Args:
        model: The model in eval mode.
        example: An input batch (its shape past the batch is the exported one).
        workdir: Where the artifacts are written.
        calibration_batches: Batches of 8 random images that set the int8 scales.

    Returns:
        Form name to function, in the table's order.
    """
    forms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager": model}
    batch = torch.export.Dim("batch", min=1, max=1024)
    forms["torch.export"] = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    forms["AOTInductor fp32 (.pt2)"] = load_artifact(export_model(model, "pt2", workdir / "model.pt2", example, True),
                                                     "pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's notes on Python values it records as constants
        forms["TorchScript trace"] = torch.jit.trace(model, example)
    forms["ONNX (onnxruntime)"] = load_artifact(export_model(model, "onnx", workdir / "model.onnx", example, True),
                                                "onnx")
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(8, *example.shape[1:], generator=generator) for _ in range(calibration_batches)]
    forms[INT8_STATIC] = load_artifact(export_model(model, "int8", workdir / "model_int8.pt2", example, True,
                                                    calibration), "int8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation: this row is the legacy path
        forms[INT8_DYNAMIC] = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return forms


def measure(name: str, batch_sizes: list[int], repeats: int) -> list[dict]:
    """Latency rows of one model."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = model.pretrained_cfg["input_size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        forms = deployment_forms(model, torch.randn(2, *size), Path(tmp))
        for batch in batch_sizes:
            images = torch.randn(batch, *size)
            reference = model(images)
            timings = time_interleaved({form: (lambda f=f, images=images: f(images)) for form, f in forms.items()},
                                       torch.device("cpu"), warmup=2, repeats=repeats)
            eager = timings["eager"].median
            for form, f in forms.items():
                rows.append({
                    "model": name, "batch": batch, "form": form,
                    "ms": round(timings[form].median * 1e3, 2),
                    "vs_eager": round(timings[form].median / eager, 2),
                    "max_abs_diff": float(f"{(f(images) - reference).abs().max().item():.2e}"),
                })
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table (speed-up: eager's time over the form's)."""
    lines = ["| model | batch | form | ms per batch | speed-up vs eager | max abs. logit diff vs eager |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['form']} | {r['ms']} | {1 / r['vs_eager']:.2f}x | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def fastest_float(rows: list[dict], model: str, batch: int) -> dict:
    """The fastest float32 form of a model at a batch size."""
    return min((r for r in rows if r["model"] == model and r["batch"] == batch and r["form"] in FLOAT_FORMS),
               key=lambda r: r["ms"])


def op_profile(name: str, batch: int = 1, calls: int = 10, top: int = 10) -> str:
    """The eager operators that take the most CPU time in a model's forward.

    Args:
        name: The model.
        batch: Images per call.
        calls: Profiled calls (after three warm-up calls).
        top: Operators listed.

    Returns:
        A markdown table: operator, calls per forward, ms per forward, share.
    """
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    images = torch.randn(batch, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        for _ in range(3):
            model(images)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(images)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"{name}, batch {batch}: {total / calls / 1e3:.2f} ms of operator time per forward", "",
             "| operator | calls per forward | ms per forward | share |", "|---|---:|---:|---:|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        lines.append(f"| {e.key} | {e.count / calls:.0f} | {e.self_cpu_time_total / calls / 1e3:.2f} | "
                     f"{e.self_cpu_time_total / total:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="also profile eager sret_t and deit_tiny at batch 1")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        rows += measure(name, [int(b) for b in args.batch_sizes.split(",")], args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, timm {timm.__version__}")
    text = f"CPU inference latency ({machine}); median of {args.repeats} timed calls per form, in turns.\n\n"
    text += markdown(rows)
    (args.out / "deploy_latency.md").write_text(text)
    (args.out / "deploy_latency.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(text)
    if args.profile:
        profiles = "\n".join(op_profile(name) for name in ("sret_t", "deit_tiny_patch16_224"))
        (args.out / "deploy_latency_profile.md").write_text(f"Eager CPU operator profile ({machine}).\n\n{profiles}")
        print(profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
