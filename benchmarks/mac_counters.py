"""MACs per image as three counters see them: vitblocks.summary, fvcore and torch's FlopCounterMode.

    python -m benchmarks.mac_counters        # writes docs/benchmarks/cpu/mac_counters.md and .json (needs fvcore)

fvcore (what timm's benchmark.py reports) traces the model and counts the operators it
has a formula for; attention through `scaled_dot_product_attention` is not one of them,
so it reports every attention-bearing model low and sliced and unsliced attention the
same. `torch.utils.flop_counter.FlopCounterMode` (FLOPs, halved here into MACs) has
formulas for the CUDA SDPA kernels but not for the CPU one, so on a CPU it misses
attention too; with attention computed as explicit matmuls (vitblocks' "math" backend,
timm's non-fused path) it sees it. `python -m vitblocks.summary` counts each layer
analytically, attention included, and agrees with the paper's numbers for SReT.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import warnings
from pathlib import Path

import timm
import torch
from timm.layers import set_fused_attn

import vitblocks  # noqa: F401 - registers the models
from vitblocks.attention import attention_backend
from vitblocks.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("sret_t", "sret_t_unsliced", "deit_tiny_patch16_224", "deit_tiny_rec_sliced_patch16_224")


def count(name: str) -> dict:
    """One model's MACs per image at 224 px by each counter, and the operators fvcore skipped."""
    from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model(name).eval()
    image = torch.randn(1, 3, 224, 224)
    ours = summarize(model, 224)[-1].macs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing and unsupported-operator warnings: their counts are reported
        analysis = FlopCountAnalysis(model, image)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fvcore_macs = analysis.total()
        skipped = sorted(analysis.unsupported_ops())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    # attention as explicit matmuls (vitblocks' math backend; timm's non-fused path), which every counter sees
    set_fused_attn(False)
    try:
        explicit = timm.create_model(name).eval()
        explicit.load_state_dict(model.state_dict())
        math_counter = FlopCounterMode(display=False)
        with math_counter, torch.no_grad(), attention_backend("math"):
            explicit(image)
    finally:
        set_fused_attn(True)
    return {"model": name, "vitblocks_summary": ours, "fvcore": fvcore_macs,
            "flop_counter_mode": counter.get_total_flops() / 2,
            "flop_counter_mode_math": math_counter.get_total_flops() / 2, "fvcore_skipped": skipped}


def markdown(rows: list[dict], environment: dict) -> str:
    lines = [f"GMACs per image at 224 px (torch {environment['torch']}, timm {environment['timm']}, fvcore "
             f"{environment['fvcore']}):", "",
             "| model | vitblocks.summary | fvcore | FlopCounterMode (CPU SDPA) | FlopCounterMode (attention as "
             "matmuls) | fvcore / summary | operators fvcore skips |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        skipped = ", ".join(f"`{op}`" for op in row["fvcore_skipped"] if "attention" in op or "matmul" in op) or "-"
        lines.append(f"| {row['model']} | {row['vitblocks_summary'] / 1e9:.3f} | {row['fvcore'] / 1e9:.3f} | "
                     f"{row['flop_counter_mode'] / 1e9:.3f} | {row['flop_counter_mode_math'] / 1e9:.3f} | "
                     f"{row['fvcore'] / row['vitblocks_summary']:.2f}x | {skipped} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu")
    args = parser.parse_args(argv)
    import fvcore

    environment = {"torch": torch.__version__, "timm": timm.__version__, "fvcore": getattr(fvcore, "__version__", "?"),
                   "python": sys.version.split()[0], "machine": platform.machine()}
    rows = [count(name) for name in MODELS]
    text = markdown(rows, environment)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mac_counters.md").write_text(text)
    (args.out / "mac_counters.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
