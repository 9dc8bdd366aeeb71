"""Markdown tables of a GPU check's measurement rows, for docs/benchmarks.md.

    python -m benchmarks.gpu_tables RUN/rows.jsonl [MORE/rows.jsonl ...] --out tables.md

Rows of later files replace rows of earlier ones that measured the same thing (a rerun of
a stage after a fix), so a partial rerun can be laid over a whole run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.gpu_check import target_lines

ATTENTION_KERNELS = ("sdpa", "xformers", "math", "sdpa/flash", "sdpa/efficient", "sdpa/cudnn", "sdpa/math")
STEP_COLUMNS = (("img_s", "img/s", 0), ("step_ms", "step ms", 1), ("host_ms", "host ms", 1),
                ("gpu_ms", "GPU ms", 1), ("kernels_per_step", "kernels", 0))


def read_runs(paths: list[Path]) -> list[dict]:
    """Rows of several `rows.jsonl` files; a later file's row replaces an earlier one of the same key.

    Args:
        paths: `rows.jsonl` files, earliest run first.

    Returns:
        The merged rows, in first-seen order.
    """
    merged: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                key = row_key(row)
                if key not in merged or "img_s" in row or "img_s" not in merged[key]:  # a refusal keeps a timing
                    merged[key] = row
    return list(merged.values())


MEASURED_FIELDS = ("img_s", "step_ms", "host_ms", "gpu_ms", "kernels_per_step", "call_ms", "unsupported",
                   "mfu_percent", "matmul_tflops")


def row_key(row: dict) -> tuple:
    """What a row measured: every field but the measurements themselves.

    Args:
        row: One row of `rows.jsonl`.

    Returns:
        A hashable key; two rows with the same key measured the same thing.
    """
    return tuple(sorted((k, json.dumps(v)) for k, v in row.items() if k not in MEASURED_FIELDS))


def attention_shape(row: dict) -> tuple:
    """The shape an attention row measured.

    Args:
        row: A row of the `attention` stage.

    Returns:
        (model, tokens, groups, heads, head_dim, prefix).
    """
    return tuple(row[k] for k in ("model", "tokens", "groups", "heads", "head_dim", "prefix"))


def attention_table(rows: list[dict]) -> str:
    """Thousands of images per second per kernel at each sliced shape, forward + backward.

    Args:
        rows: Measurement rows; those of the `attention` stage are used.

    Returns:
        A Markdown table, one line per shape, with SDPA's ratios to xformers and `math`.
    """
    shapes: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["stage"] == "attention" and "img_s" in row:
            shapes.setdefault(attention_shape(row), {})[row["kernel"]] = row["img_s"]
    kernels = [k for k in ATTENTION_KERNELS if any(k in speeds for speeds in shapes.values())]
    padded = sorted({k for speeds in shapes.values() for k in speeds if k.startswith("sdpa padded")})
    head = ["shape (tokens / groups x heads x head size, prefix)", *kernels, *padded, "sdpa / xformers", "sdpa / math"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for (model, tokens, groups, heads, head_dim, prefix), speeds in shapes.items():
        cells = [f"{model} {tokens} / {groups} x {heads} x {head_dim}, {prefix}"]
        cells += [f"{speeds[k] / 1e3:.0f}" if k in speeds else "-" for k in (*kernels, *padded)]
        cells += [f"{speeds['sdpa'] / speeds[k]:.2f}x" if k in speeds and "sdpa" in speeds else "-"
                  for k in ("xformers", "math")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def step_table(rows: list[dict], stages: tuple[str, ...]) -> str:
    """Steps of the given stages: images per second, step, host and GPU time, kernels per step.

    Args:
        rows: Measurement rows.
        stages: Which stages' named rows to list.

    Returns:
        A Markdown table with the columns any of those rows has.
    """
    chosen = [r for r in rows if r["stage"] in stages and "img_s" in r and "name" in r]
    columns = [c for c in STEP_COLUMNS if any(c[0] in r for r in chosen)]
    lines = ["| stage | measured | " + " | ".join(label for _, label, _ in columns) + " |",
             "|---|---" + "|---:" * len(columns) + "|"]
    for row in chosen:
        cells = [row["stage"], row["name"]]
        cells += [f"{row[key]:.{digits}f}" if key in row else "-" for key, _, digits in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The whole report: target ratios, attention kernels, training and inference steps.

    Args:
        rows: Merged measurement rows (`read_runs`).

    Returns:
        Markdown text.
    """
    devices = sorted({r["device"] for r in rows})
    parts = [f"Device: {', '.join(devices)}.", "", "Target ratios:", ""]
    parts += [f"- {line}" for line in target_lines(rows)]
    parts += ["", "Attention, forward + backward, bf16, thousands of images per second (in rows measured since "
              "2026-12-04, `sdpa` and `sdpa/*` pad SReT-S's 42-channel heads to 48 inside the call):",
              "", attention_table(rows)]
    parts += ["", "Training steps (batch 256) and the other measured calls:", "",
              step_table(rows, ("eager", "compiled-sret", "compiled-deit", "pool", "mfu"))]
    parts += ["", "Routed against static recursion (bf16; training at batch 256, inference at 1024):", "",
              step_table(rows, ("dynamic", "inference"))]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: the command line).

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_tables", description=__doc__.split("\n")[0])
    parser.add_argument("rows", type=Path, nargs="+", help="rows.jsonl files of GPU check runs, earliest first")
    parser.add_argument("--out", type=Path, help="write the tables here (default: print them)")
    args = parser.parse_args(argv)
    text = markdown(read_runs(args.rows))
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
