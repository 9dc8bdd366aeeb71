"""Converting a trained ViT to shared blocks with per-loop LoRA, on the offline digits data.

    python -m benchmarks.sharing_digits            # about 8 minutes on 2 CPU cores
    python -m benchmarks.sharing_digits --base-epochs 1 --uptrain-epochs 1 --inits first --ranks 0,full --out /tmp/x

Trains the 6-block ViT of recipes/digits_vit_base.py (the base), then for every
shared-weight initialisation and LoRA rank converts it with recipes/digits_uptrain.py's
settings (3 unique blocks cycled twice, per-loop norms and biases), evaluates the
converted model as it is, uptrains it by distillation from the base for a few epochs
(that recipe) and evaluates it again; last, it evaluates one uptrained model at other
loop counts (test-time depth). Top-1 is on the held-out fifth of the digits, after the
last epoch (no best-epoch selection). Writes `sharing_digits.md` (the tables
docs/sharing.md shows) and `sharing_digits.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import timm
import torch

from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.train import Trainer, derive, load_recipe
from vitblocks.train.run.builders import build_data, build_model
from vitblocks.train.run.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def parameters(model: torch.nn.Module) -> int:
    """Parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters())


def train_base(workdir: Path, epochs: int) -> tuple[Path, dict]:
    """Train the unshared base; return its last checkpoint and its row."""
    config = derive(load_recipe(RECIPES / "digits_vit_base.py"), epochs=epochs, output_dir=str(workdir / "base"))
    Trainer(config, overwrite=True).fit(progress=False)
    checkpoint = workdir / "base" / "last.pth"
    top1 = evaluate_checkpoint(str(checkpoint))["val_top1"]
    row = {"model": "6-block ViT (the base, unshared)", "init": None, "rank": None,
           "parameters": parameters(build_model(config)), "top1_converted": round(top1, 2), "top1_uptrained": None}
    return checkpoint, row


def convert_and_uptrain(base: Path, workdir: Path, init: str, rank: int | str, epochs: int) -> tuple[dict, Path]:
    """Convert the base, evaluate it, uptrain it by distillation, evaluate again."""
    config = derive(load_recipe(RECIPES / "digits_uptrain.py"),
                    model={"convert": {"base_checkpoint": str(base), "init": init, "rank": rank}},
                    distill={"teacher_checkpoint": str(base)}, epochs=epochs,
                    output_dir=str(workdir / f"{init}_rank{rank}"))
    model = build_model(config)
    data = build_data(config, train=False)
    converted = evaluate(model.eval(), data.val_loader(), torch.device("cpu"))["val_top1"]
    Trainer(config, overwrite=True).fit(progress=False)
    checkpoint = Path(config.output_dir) / "last.pth"
    uptrained = evaluate_checkpoint(str(checkpoint))["val_top1"]
    row = {"model": "3 shared blocks, cycled twice", "init": init, "rank": rank, "parameters": parameters(model),
           "top1_converted": round(converted, 2), "top1_uptrained": round(uptrained, 2)}
    return row, checkpoint


def depth_rows(checkpoint: Path, trained: int, loops: list[int]) -> list[dict]:
    """Top-1 of one uptrained model evaluated with other loop counts."""
    return [{"loops": n, "trained": n == trained,
             "top1": round(evaluate_checkpoint(str(checkpoint), loops=n)["val_top1"], 2)}
            for n in loops]


def markdown(rows: list[dict], depth: list[dict], depth_model: str) -> str:
    """The conversion table and the test-time depth table."""
    lines = ["| model | shared init | LoRA rank | parameters | top-1 as converted | top-1 after uptraining |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        uptrained = "—" if r["top1_uptrained"] is None else f"{r['top1_uptrained']:.2f}%"
        lines.append(f"| {r['model']} | {r['init'] or '—'} | {'—' if r['rank'] is None else r['rank']} | "
                     f"{r['parameters']:,} | {r['top1_converted']:.2f}% | {uptrained} |")
    lines += ["", f"Test-time depth of the uptrained {depth_model} model (trained with 2 loops):", "",
              "| loops at evaluation | "
              + " | ".join(f"{d['loops']}{' (trained)' if d['trained'] else ''}" for d in depth) + " |",
              "|---|" + "---:|" * len(depth),
              "| top-1 | " + " | ".join(f"{d['top1']:.2f}%" for d in depth) + " |"]
    return "\n".join(lines) + "\n"


def _rank(value: str) -> int | str:
    return value if value == "full" else int(value)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharing_digits", description=__doc__.split("\n")[0])
    parser.add_argument("--base-epochs", type=int, default=load_recipe(RECIPES / "digits_vit_base.py").epochs)
    parser.add_argument("--uptrain-epochs", type=int, default=load_recipe(RECIPES / "digits_uptrain.py").epochs)
    parser.add_argument("--inits", default="first,average,stepwise")
    parser.add_argument("--ranks", default="0,4,8,full")
    parser.add_argument("--depth-loops", default="1,2,3,4")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        base, base_row = train_base(workdir, args.base_epochs)
        rows, checkpoints = [base_row], {}
        for init in args.inits.split(","):
            for rank in map(_rank, args.ranks.split(",")):
                row, checkpoints[(init, rank)] = convert_and_uptrain(base, workdir, init, rank, args.uptrain_epochs)
                rows.append(row)
                print(row, flush=True)
        recipe = load_recipe(RECIPES / "digits_uptrain.py").model.convert
        chosen = ((recipe["init"], recipe["rank"]) if (recipe["init"], recipe["rank"]) in checkpoints
                  else list(checkpoints)[-1])
        depth = depth_rows(checkpoints[chosen], 2, [int(n) for n in args.depth_loops.split(",")])
    depth_model = f"init {chosen[0]}, rank {chosen[1]}"
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, timm {timm.__version__}")
    text = (f"Digits (scikit-learn's 8x8 images at 32 px, a fifth held out); base trained {args.base_epochs} epochs, "
            f"each conversion uptrained {args.uptrain_epochs} epochs by distillation from it ({machine}).\n\n")
    text += markdown(rows, depth, depth_model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharing_digits.md").write_text(text)
    (args.out / "sharing_digits.json").write_text(json.dumps(
        {"machine": machine, "base_epochs": args.base_epochs, "uptrain_epochs": args.uptrain_epochs,
         "rows": rows, "depth_model": depth_model, "depth": depth}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
