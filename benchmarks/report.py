"""Benchmark results as CSV, a markdown report and PNG plots."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

PLOTTED = ("models", "vs_naive")


def markdown_table(results: list[Any]) -> str:
    """One row per measured configuration."""
    lines = ["| group | configuration | backend | mode | img/s | IQR % | peak MiB |",
             "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r.group} | {r.name} | {r.backend} | {r.mode} | {r.img_s:.1f} | {r.iqr_pct:.1f} | {r.peak_mib:.1f} |"
              for r in results]
    return "\n".join(lines)


def write_report(results: list[Any], ratios: list[str], environment: dict, out: Path, title: str) -> None:
    """Write results.csv, results.md (table, ratios, environment), throughput.png and memory.png.

    Args:
        results: Measured rows (dataclass instances with group, name, backend, mode,
            img_s, iqr_pct and peak_mib).
        ratios: Lines comparing rows of the run.
        environment: Machine, versions and settings.
        out: Folder to write into (created if missing).
        title: Settings shown in the plot titles.
    """
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in results)
    text = markdown_table(results) + "\n\n" + "\n".join(f"- {line}" for line in ratios)
    text += "\n\nEnvironment:\n\n```json\n" + json.dumps(environment, indent=2, default=str) + "\n```\n"
    (out / "results.md").write_text(text)
    _plot(results, out, title)


def _plot(results: list[Any], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, mode in zip(axes, ("infer", "train")):
        # sret_t and deit_tiny appear in both groups; the models group's rows stand for them.
        chosen = [r for r in results if r.group in PLOTTED and r.mode == mode
                  and not (r.group == "vs_naive" and r.name in ("sret_t", "deit_tiny_patch16_224"))]
        colors = ["tab:red" if "naive" in r.name else "tab:green" if "compile" in r.name else "tab:blue"
                  for r in chosen]
        ax.barh([r.name for r in chosen], [r.img_s for r in chosen], color=colors)
        ax.invert_yaxis()
        ax.set(title=f"{mode} throughput", xlabel="images / s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)

    recursion = [r for r in results if r.group == "recursion"]
    if not recursion:  # a run of other groups only (--groups)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("off", "sqrt"):
        rows = [r for r in recursion if r.name.endswith(f"checkpointing={mode}")]
        ax.plot([int(r.name.split()[0]) for r in rows], [r.peak_mib for r in rows], marker="o",
                label=f"checkpointing {mode}")
    ax.set(xscale="log", yscale="log", xlabel="block applications", ylabel="training peak MiB",
           title="Recursion depth vs training memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=90)
    plt.close(fig)
