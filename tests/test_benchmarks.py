import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def test_quick_cpu_suite_writes_tables_ratios_and_plot(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    groups = {r["group"] for r in rows}
    assert {"models", "naive", "backends", "recursion"} <= groups
    assert all(float(r["img_s"]) > 0 for r in rows)
    report = (tmp_path / "results.md").read_text()
    assert "optimized / naive" in report and "sliced / unsliced" in report and '"torch"' in report
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_suite_refuses_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "cuda"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "needs a CUDA device" in result.stderr
