"""CPU inference latency of each deployment form of a model, against eager PyTorch.

    python -m benchmarks.deploy_latency                       # SReT-T and sliced DeiT-Tiny, batch 1 and 8
    python -m benchmarks.deploy_latency --models sret_t --batch-sizes 1 --repeats 10

Every form is built from one model in eval mode: eager, `torch.export` (the exported
program's module), AOTInductor (that program compiled ahead of time into a `.pt2`
package, loaded back with `aoti_load_package`), TorchScript (`torch.jit.trace`), ONNX
(the dynamo exporter, run in onnxruntime on the CPU) and int8 dynamic quantization of
the linear layers (`torch.ao.quantization.quantize_dynamic`). Each form is built once and
serves every batch size timed (the exports with a dynamic batch). The forms are timed
in turns in one process (`time_interleaved`), so the ratios against eager are what to
compare; the largest difference of each form's logits from eager's is reported too.
Writes `deploy_latency.md` (the table docs/deploy.md shows) and `deploy_latency.json`.
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

import vitblocks  # noqa: F401 - registers the models
from benchmarks.measure import time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def deployment_forms(
    model: torch.nn.Module, example: torch.Tensor, workdir: Path
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Each deployment form of `model` as a function of a batch of images."""
    import onnxruntime
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    forms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"eager": model}
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    forms["torch.export"] = exported.module()
    package = aoti_compile_and_package(exported, package_path=str(workdir / "model.pt2"))
    forms["AOTInductor (.pt2)"] = aoti_load_package(package)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forms["TorchScript trace"] = torch.jit.trace(model, example)
        path = workdir / "model.onnx"
        torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, dynamic_shapes=({0: batch},))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    forms["ONNX (onnxruntime)"] = lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    forms["int8 dynamic quantization"] = torch.ao.quantization.quantize_dynamic(
        model, {torch.nn.Linear}, dtype=torch.qint8)
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
    """The rows as a markdown table."""
    lines = ["| model | batch | form | ms per batch | time vs eager | max abs. logit diff vs eager |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['form']} | {r['ms']} | {r['vs_eager']}x | "
                     f"{r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deploy_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sret_t,deit_tiny_rec_sliced_patch16_224")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=20)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
