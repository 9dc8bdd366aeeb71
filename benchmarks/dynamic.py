"""Token routing against static recursion: accuracy against measured MACs, and CPU inference speed.

    python -m benchmarks.dynamic                 # about 6 minutes on 2 CPU cores
    python -m benchmarks.dynamic --epochs 1 --speed-batch 8 --out /tmp/x    # the harness, quickly

Trained rows: the quickstart's small SReT on the digits (recipes/quickstart.py, with one
group on every loop so that every loop can be routed), trained the same way for each
configuration (`--epochs`, fewer than the recipe's, so that the static model stays below
98% and the configurations can differ): static recursion at 1 to 4 loops; 4 loops with
expert-choice routing at capacity 0.5 and 0.25 on the loops after the first; 4 loops with
token-choice routing (capacities 1, 3/4, 1/2, 1/4, balancing loss on); and 4 loops with an
early exit after every block application of the last stage but the last, trained once
with a loss at each exit and scored at several thresholds. Top-1 is on the held-out fifth
of the digits after the last epoch.

Speed rows: eager CPU inference at batch `--speed-batch`, 224 px, of SReT-T and of
DeiT-Tiny made recursive (2 loops per block), each static and routed at capacity 0.5, timed
in turns in this one process.

`block_macs` is measured per image by `vitblocks.summary` (torch's FLOP counter on the
calls the model actually makes, so routed loops count only the tokens they update): the
MACs of the blocks' part of the network, every stage (blocks, mix layers, routers,
pooling), without the stem and the head. Early-exit rows depend on the images, so they are
counted with the same counter over the validation images. Writes `dynamic.json`,
`dynamic.md` and `dynamic.png` (docs/dynamic.md shows the tables and the plot).
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
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.measure import time_interleaved
from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.layers import set_exit_threshold
from vitblocks.models.plug import make_recursive
from vitblocks.summary import summarize
from vitblocks.train import Trainer, derive, load_recipe

ROOT = Path(__file__).resolve().parents[1]
UNSLICED_QUICKSTART = ((4, 1, 1, 1), (1,), (1,))
"""The quickstart's group schedule with one group after the first loop: routed loops need one group."""

TRAINED = [
    ("static, 1 loop", "static", dict(loops=1)),
    ("static, 2 loops", "static", dict(loops=2)),
    ("static, 3 loops", "static", dict(loops=3)),
    ("static, 4 loops", "static", dict(loops=4)),
    ("expert-choice, 4 loops, capacity 0.5", "expert", dict(loops=4, routing={"capacity": 0.5})),
    ("expert-choice, 4 loops, capacity 0.25", "expert", dict(loops=4, routing={"capacity": 0.25})),
    ("token-choice, 4 loops", "token", dict(loops=4, routing={"mode": "token"})),
]
EXIT_TRAINED = ("early exit, 4 loops", dict(loops=4, early_exit={}))
"""Trained once, with a loss at every exit, then scored at each of `EXIT_THRESHOLDS`."""
EXIT_THRESHOLDS = (2.0, 0.9, 0.8, 0.7, 0.6, 0.5)


def block_macs(model: torch.nn.Module, img_size: int) -> int:
    """MACs per image of every stage of a model (`vitblocks.summary`), stem and head left out."""
    rows = summarize(model, img_size)
    return sum(row.macs for row in rows if row.name.startswith(("stages.", "blocks", "transformers.")))


def train(name: str, options: dict, epochs: int, workdir: Path) -> Trainer:
    """Train the quickstart SReT with `options`."""
    base = load_recipe(ROOT / "recipes" / "quickstart.py")
    kwargs = {**base.model.kwargs, "groups": UNSLICED_QUICKSTART, **options}
    folder = workdir / "".join(c if c.isalnum() else "_" for c in name)
    config = derive(base, model={"kwargs": kwargs}, epochs=epochs, output_dir=str(folder))
    torch.manual_seed(0)
    trainer = Trainer(config, overwrite=True)
    trainer.fit(progress=False)
    return trainer


def trained_row(name: str, kind: str, options: dict, epochs: int, workdir: Path) -> dict:
    """Train the quickstart SReT with `options` and score it."""
    trainer = train(name, options, epochs, workdir)
    top1 = evaluate_checkpoint(str(Path(trainer.config.output_dir) / "last.pth"))["val_top1"]
    return {"name": name, "kind": kind, "model": "quickstart SReT (digits, 32 px)",
            "block_macs": block_macs(trainer.model.eval(), trainer.config.data.img_size), "top1": round(top1, 2)}


def measured_macs(model: torch.nn.Module, loader) -> float:
    """MACs per image of the model's actual calls over a whole loader (torch's FLOP counter)."""
    images = 0
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        for inputs, _ in loader:
            model(inputs)
            images += inputs.shape[0]
    return counter.get_total_flops() / 2 / images


def exit_rows(epochs: int, workdir: Path) -> list[dict]:
    """Train with early exits once, then score and count at each threshold: stopped images save the rest
    of the stage, the exits' head calls are paid for."""
    name, options = EXIT_TRAINED
    trainer = train(name, options, epochs, workdir)
    model, size = trainer.model.eval(), trainer.config.data.img_size
    loader = trainer.data.val_loader(torch.device("cpu"))
    set_exit_threshold(model, 2.0)  # no image stops: the stem's and head's MACs, by the same counter
    outside_blocks = measured_macs(model, loader) - block_macs(model, size)
    rows = []
    for threshold in EXIT_THRESHOLDS:
        set_exit_threshold(model, threshold)
        metrics = evaluate_checkpoint(str(Path(trainer.config.output_dir) / "last.pth"), exit_threshold=threshold)
        label = "no exit taken" if threshold > 1 else f"threshold {threshold}"
        rows.append({"name": f"{name}, {label}", "kind": "exit", "model": "quickstart SReT (digits, 32 px)",
                     "block_macs": round(measured_macs(model, loader) - outside_blocks), "top1":
                     round(metrics["val_top1"], 2), "applications": round(metrics.get("applications", 4.0), 3)})
    return rows


def _deit_recursive(routing: dict | None) -> torch.nn.Module:
    model = timm.create_model("deit_tiny_patch16_224")
    make_recursive(model, loops=2, routing=routing)
    return model.eval()


def speed_rows(batch: int) -> list[dict]:
    """Static and routed SReT-T and recursive DeiT-Tiny, timed in turns."""
    torch.manual_seed(0)
    groups = ((8, 1), (4, 1), (1, 1))
    pairs = {
        "SReT-T": (timm.create_model("sret_t", groups=groups).eval(),
                   timm.create_model("sret_t", groups=groups, routing={"capacity": 0.5}).eval()),
        "DeiT-Tiny, 2 loops per block": (_deit_recursive(None), _deit_recursive({"capacity": 0.5})),
    }
    images = torch.randn(batch, 3, 224, 224)
    calls = {}
    for label, (static, routed) in pairs.items():
        for kind, model in (("static", static), ("expert", routed)):
            calls[(label, kind)] = (lambda m=model: m(images))
    with torch.no_grad():
        timings = time_interleaved({f"{label}|{kind}": fn for (label, kind), fn in calls.items()},
                                   torch.device("cpu"), warmup=1, repeats=3)
    rows = []
    for label, (static, routed) in pairs.items():
        baseline = batch / timings[f"{label}|static"].median
        for kind, model in (("static", static), ("expert", routed)):
            name = f"{label}, {'static' if kind == 'static' else 'expert-choice, capacity 0.5'}"
            rows.append({"name": name, "kind": kind, "model": label, "batch": batch,
                         "block_macs": block_macs(model, 224),
                         "img_s": round(batch / timings[f"{label}|{kind}"].median, 2),
                         "baseline_img_s": round(baseline, 2)})
    return rows


def markdown(rows: list[dict], machine: str, epochs: int) -> str:
    """The accuracy table and the speed table."""
    trained = [r for r in rows if "top1" in r]
    speed = [r for r in rows if "img_s" in r]
    static_4 = next(r for r in trained if r["name"] == "static, 4 loops")
    lines = [f"Digits, {epochs} epochs each ({machine}); block MACs per image, measured (early exit: over the "
             "validation images, the exits' head calls included):", "",
             "| configuration | block MACs | vs static 4 loops | top-1 |", "|---|---:|---:|---:|"]
    for r in trained:
        lines.append(f"| {r['name']} | {r['block_macs']:,} | {r['block_macs'] / static_4['block_macs']:.2f}x | "
                     f"{r['top1']:.2f}% |")
    lines += ["", f"CPU eager inference, batch {speed[0]['batch'] if speed else '—'}, 224 px, timed in turns:", "",
              "| model | block MACs | img/s | vs static |", "|---|---:|---:|---:|"]
    for r in speed:
        ratio = r["img_s"] / r["baseline_img_s"]
        lines.append(f"| {r['name']} | {r['block_macs']:,} | {r['img_s']:.2f} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Top-1 against measured block MACs, one marker per kind of configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if "top1" in r]
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for kind, marker in (("static", "o"), ("expert", "s"), ("token", "D"), ("exit", "^")):
        chosen = [r for r in trained if r["kind"] == kind]
        if chosen:
            axes.plot([r["block_macs"] / 1e6 for r in chosen], [r["top1"] for r in chosen], marker=marker,
                      linestyle="-" if kind in ("static", "exit") else "none", label=kind)
    axes.set_xlabel("block MACs per image (millions, measured)")
    axes.set_ylabel("top-1 on the digits (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dynamic", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "cpu")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, options in TRAINED:
            rows.append(trained_row(name, kind, options, args.epochs, Path(tmp)))
            print(rows[-1], flush=True)
        rows += exit_rows(args.epochs, Path(tmp))
        print(rows[-len(EXIT_THRESHOLDS):], flush=True)
    rows += speed_rows(args.speed_batch)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, timm {timm.__version__}")
    text = markdown(rows, machine, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dynamic.md").write_text(text)
    plot(rows, args.out / "dynamic.png")
    (args.out / "dynamic.json").write_text(json.dumps({"machine": machine, "epochs": args.epochs, "rows": rows},
                                                      indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
