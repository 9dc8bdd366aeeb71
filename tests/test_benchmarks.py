import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


@pytest.mark.slow  # starts benchmark processes
def test_quick_cpu_suite_writes_tables_ratios_and_plot(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    groups = {r["group"] for r in rows}
    assert {"models", "vs_naive", "backends", "recursion"} <= groups
    assert any(r["name"] == "sret_t naive (official computation)" for r in rows)
    assert all(float(r["img_s"]) > 0 for r in rows)
    report = (tmp_path / "results.md").read_text()
    assert "optimized / naive" in report and "sliced / unsliced" in report and '"torch"' in report
    assert report.index("HARNESS CHECK (--quick)") < report.index("optimized / naive")  # ratios marked meaningless
    from benchmarks.run import default_out

    assert default_out("cpu", quick=True).name == "cpu-quick" and default_out("cpu", quick=False).name == "cpu"
    for plot in ("throughput.png", "memory.png"):
        assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # starts benchmark processes
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_suite_refuses_without_a_gpu():
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "cuda"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "needs a CUDA device" in result.stderr


def test_naive_baseline_computes_what_sret_t_computes():
    import timm

    from benchmarks.run import naive_sret_t

    model = timm.create_model("sret_t", img_size=64, num_classes=10, eval_permutation="official").eval()
    naive = naive_sret_t(model, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(3)
    expected = naive(x)
    torch.manual_seed(3)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_ratios_compare_rows_of_the_run():
    from benchmarks.run import NAIVE, PAIRED, Result, ratios

    rows = [Result("models", "sret_t", "auto", "train", 28.0, 1.0, 10.0),
            Result(PAIRED, "sret_t", "auto", "train", 30.0, 1.0, 10.0),
            Result(PAIRED, NAIVE, "math", "train", 20.0, 1.0, 10.0),
            Result("models", "sret_t_unsliced", "auto", "train", 24.0, 1.0, 10.0),
            Result("recursion", "1000 applications, checkpointing=off", "auto", "train", 1.0, 1.0, 900.0),
            Result("recursion", "1000 applications, checkpointing=sqrt", "auto", "train", 1.0, 1.0, 100.0)]
    lines = ratios(rows)
    assert "SReT-T train: optimized / naive = 1.50x (target 1.5x)" in lines
    assert "sret_t train: sliced / unsliced = 1.17x (MAC ratio 1.366/1.112 = 1.23x)" in lines
    assert "1000 applications: training memory without / with checkpointing = 9.0x" in lines
    assert not any("infer" in line for line in lines)  # no rows, no ratio


def test_interleaved_timing_runs_functions_in_turns():
    from benchmarks.measure import time_interleaved

    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               torch.device("cpu"), warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"} and all(t.repeats == 3 and t.median >= 0 for t in timings.values())


@pytest.mark.parametrize("run", ["cpu", "cpu-bf16", "cuda"])
def test_docs_page_shows_the_ratios_of_its_committed_results(run):
    from benchmarks.run import Result, ratios

    folder = ROOT / "docs" / "benchmarks" / run
    rows = [Result(r["group"], r["name"], r["backend"], r["mode"], float(r["img_s"]), float(r["iqr_pct"]),
                   float(r["peak_mib"])) for r in csv.DictReader((folder / "results.csv").open())]
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    lines = ratios(rows)
    assert len(lines) >= 10 and all(f"- {line}\n" in page for line in lines)
    plots = sorted(folder.glob("*.png"))
    assert plots and all(p.read_bytes()[:4] == b"\x89PNG" and f"benchmarks/{run}/{p.name}" in page for p in plots)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_memory_is_measured_in_the_precision_of_the_run(precision):
    from benchmarks.run import _forward_backward_fn

    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().forward(x)

    _forward_backward_fn(Probe(4, 2), torch.randn(3, 4), precision)()
    assert seen == [precision == "bf16"]


@pytest.mark.slow  # starts benchmark processes
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """The GPU check's every stage, at tiny sizes on the CPU, so the script cannot rot between GPU runs."""
    import os

    out = tmp_path / "check"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"],
                            capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable),
                            timeout=3600)  # the dry run's own limits are generous: a loaded CI machine must pass
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    for stage in ("steps", "train-eager", "profile", "tests"):
        assert f"| {stage} | ok |" in summary, summary
    assert "| train-graphs | skipped: CUDA graphs need a GPU |" in summary
    assert "tests: " in summary and "skipped" in summary  # the CUDA tests ran and skipped cleanly
    assert "- eager: " in summary and "img/s" in summary
    for target in ("SReT-T training / deit_tiny, both eager", "SReT-T inference / deit_tiny, autocast eager",
                   "sliced / unsliced", "SReT-S model FLOP utilisation", "pooling 64->128",
                   "check sret_t torch.compile vs eager", "random permutations differ between calls: differ=True",
                   "sret_t expert 0.5 routing / static, bf16 training", "deit_tiny 2 loops token routing / static"):
        assert target in summary, (target, summary)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    stages = {row["stage"] for row in rows}
    assert stages == {"attention", "eager", "pool", "compiled-sret", "compiled-deit", "inference", "mfu", "dynamic"}
    assert all(row["device"] == "cpu" for row in rows)
    kernels = {row["kernel"] for row in rows if row["stage"] == "attention"}
    assert {"sdpa/math", "math", "sdpa padded to 48"} <= kernels  # SReT-S's head size 42, padded
    assert summary.strip().splitlines()[-1] in result.stdout  # the table of ratios is printed last
    assert (out / "profile.txt").read_text().startswith("# sret_t")
    assert json.loads((out / "environment.json").read_text())["dry_run"] is True
    assert "(up to 1500 s)" in result.stdout  # the steps stage: five times its limit, not a wall a loaded CPU hits


def test_docs_page_shows_the_committed_compile_time_table():
    table = (ROOT / "docs" / "benchmarks" / "compile-cpu" / "compile_time.md").read_text().split("\n", 2)[2].strip()
    rows = list(csv.DictReader((ROOT / "docs" / "benchmarks" / "compile-cpu" / "compile_time.csv").open()))
    assert {r["mode"] for r in rows} == {"model", "regional"} and {r["loops"] for r in rows} == {"2", "10", "100"}
    assert table and table in (ROOT / "docs" / "benchmarks.md").read_text()


def test_compile_time_table_marks_cases_that_ran_out_of_time():
    from benchmarks.compile_time import markdown

    text = markdown([{"mode": "model", "loops": 100, "applications": 1000, "status": "> 300 s"},
                     {"mode": "regional", "loops": 100, "applications": 1000, "first_step_s": 75.0, "step_s": 2.7,
                      "compile_s": 72.3, "graphs": 7, "status": "ok"}], "test")
    assert "| model | 100 | 1000 | > 300 s |" in text and "| regional | 100 | 1000 | 75.0 | 2.7 | 72.3 | 7 |" in text


@pytest.mark.slow  # starts benchmark processes
def test_compile_time_runs_each_case_in_a_fresh_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.compile_time", "--backend", "eager", "--img-size", "32",
                             "--loops", "2,5", "--modes", "regional", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "compile_time.csv").open()))
    assert [(r["mode"], r["loops"], r["status"]) for r in rows] == [("regional", "2", "ok"), ("regional", "5", "ok")]
    assert rows[0]["graphs"] == rows[1]["graphs"]  # more loops, no more graphs
    assert "| regional | 5 | 50 |" in (tmp_path / "compile_time.md").read_text()


@pytest.mark.slow  # starts benchmark processes
def test_a_run_of_some_groups_writes_its_report(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "cpu", "--quick", "--groups",
                             "vs_naive,reference", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["group"] for r in rows} == {"vs_naive", "reference"}
    assert (tmp_path / "throughput.png").exists() and not (tmp_path / "memory.png").exists()
    assert "timed in turns" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # starts benchmark processes
def test_unknown_benchmark_group_is_refused():
    result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--groups", "modles"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "unknown group(s) modles" in result.stderr


def test_deploy_page_shows_the_latency_table_of_its_committed_run():
    from benchmarks.deploy_latency import FLOAT_FORMS, INT8_DYNAMIC, INT8_STATIC, markdown

    run = json.loads((ROOT / "docs" / "benchmarks" / "cpu" / "deploy_latency.json").read_text())
    page = (ROOT / "docs" / "deploy.md").read_text()
    assert markdown(run["rows"]).strip() in page
    assert {row["form"] for row in run["rows"]} == {*FLOAT_FORMS, INT8_STATIC, INT8_DYNAMIC}
    assert {row["model"] for row in run["rows"]} >= {"sret_t", "deit_tiny_patch16_224", "pit_ti_224"}  # baselines
    # one dynamic-batch package serves both batch sizes
    assert {row["batch"] for row in run["rows"] if row["form"] == INT8_STATIC} == {1, 8}
    assert all(row["max_abs_diff"] < 1e-4 for row in run["rows"] if row["form"] in FLOAT_FORMS)
    accuracy = (ROOT / "docs" / "benchmarks" / "cpu" / "int8_accuracy.md").read_text()
    assert accuracy.split("\n\n", 1)[1].strip() in page  # the int8 accuracy table of its committed run


def _sharing_block(text):
    import re

    return re.search(r"<!-- sharing-digits:start -->\n(.*)\n<!-- sharing-digits:end -->", text, flags=re.S).group(1)


def test_sharing_page_shows_the_digits_table_of_its_committed_run():
    from benchmarks.sharing_digits import markdown

    run = json.loads((ROOT / "docs" / "benchmarks" / "cpu" / "sharing_digits.json").read_text())
    committed = (ROOT / "docs" / "benchmarks" / "cpu" / "sharing_digits.md").read_text()
    assert markdown(run["rows"], run["depth"], run["depth_model"]) in committed
    assert _sharing_block((ROOT / "docs" / "sharing.md").read_text()).strip() == committed.strip()
    base, conversions = run["rows"][0], run["rows"][1:]
    assert {(r["init"], r["rank"]) for r in conversions} == {
        (init, rank) for init in ("first", "average", "stepwise") for rank in (0, 4, 8, "full")}
    assert all(r["parameters"] < base["parameters"] for r in conversions if r["rank"] != "full")
    # full rank reproduces the base exactly, on real data
    assert all(r["top1_converted"] == base["top1_converted"] for r in conversions if r["rank"] == "full")


def test_training_guide_shows_the_feed_table_of_its_committed_run():
    from benchmarks.feed import markdown

    run = json.loads((ROOT / "docs" / "benchmarks" / "cpu" / "feed.json").read_text())
    table = markdown(run["loader"], run["step"], run["environment"])
    assert table == (ROOT / "docs" / "benchmarks" / "cpu" / "feed.md").read_text()
    assert table.strip() in (ROOT / "docs" / "training.md").read_text()
    for row in run["loader"]:
        assert row["ratio"] == pytest.approx(row["uint8_ms_per_image"] / row["float32_ms_per_image"])
    assert run["step"]["ratio"] == pytest.approx(run["step"]["trainer_img_s"] / run["step"]["bare_step_img_s"])


def test_models_page_shows_the_mac_counters_table_of_its_committed_run():
    from benchmarks.mac_counters import markdown

    run = json.loads((ROOT / "docs" / "benchmarks" / "cpu" / "mac_counters.json").read_text())
    table = markdown(run["rows"], run["environment"])
    assert table == (ROOT / "docs" / "benchmarks" / "cpu" / "mac_counters.md").read_text()
    assert table.strip() in (ROOT / "docs" / "models.md").read_text()
    rows = {row["model"]: row for row in run["rows"]}
    for row in rows.values():  # attention as matmuls: torch's counter and the analytic summary agree
        assert row["flop_counter_mode_math"] == pytest.approx(row["vitblocks_summary"], rel=1e-3)
    assert rows["sret_t"]["fvcore"] == rows["sret_t_unsliced"]["fvcore"]  # fvcore cannot tell slicing apart
    assert rows["sret_t"]["vitblocks_summary"] < rows["sret_t_unsliced"]["vitblocks_summary"]


def test_dynamic_page_shows_the_tables_of_its_committed_run():
    import re

    from benchmarks.dynamic import EXIT_THRESHOLDS, EXIT_TRAINED, TRAINED, markdown

    run = json.loads((ROOT / "docs" / "benchmarks" / "cpu" / "dynamic.json").read_text())
    committed = (ROOT / "docs" / "benchmarks" / "cpu" / "dynamic.md").read_text()
    assert markdown(run["rows"], run["machine"], run["epochs"]) == committed
    page = (ROOT / "docs" / "dynamic.md").read_text()
    shown = re.search(r"<!-- dynamic:start -->\n(.*)\n<!-- dynamic:end -->", page, flags=re.S).group(1)
    assert shown.strip() == committed.strip()
    assert "![top-1 against measured block MACs](benchmarks/cpu/dynamic.png)" in page
    assert (ROOT / "docs" / "benchmarks" / "cpu" / "dynamic.png").stat().st_size > 10_000
    trained = [r for r in run["rows"] if "top1" in r]
    assert [r["name"] for r in trained][:len(TRAINED)] == [name for name, _, _ in TRAINED]
    assert len(trained) == len(TRAINED) + len(EXIT_THRESHOLDS)
    assert all(r["name"].startswith(EXIT_TRAINED[0]) for r in trained[len(TRAINED):])
    assert {r["kind"] for r in run["rows"]} == {"static", "expert", "token", "exit"}
    exits = [r for r in trained if r["kind"] == "exit"]
    assert [r["block_macs"] for r in exits[1:]] == sorted((r["block_macs"] for r in exits[1:]), reverse=True)
    assert exits[0]["block_macs"] == next(r for r in trained if r["name"] == "static, 4 loops")["block_macs"]
    static = {r["name"]: r["block_macs"] for r in trained if r["kind"] == "static"}
    assert list(static.values()) == sorted(static.values())  # measured MACs grow with the loops
    assert all(r["block_macs"] < static["static, 4 loops"] for r in trained if r["kind"] in ("expert", "token"))
    for r in run["rows"]:
        if "img_s" in r and r["kind"] == "static":
            assert r["img_s"] == r["baseline_img_s"]


def test_benchmarks_page_shows_the_gpu_check_tables_of_its_committed_rows():
    import re

    from benchmarks.gpu_tables import markdown, read_runs

    folder = ROOT / "docs" / "benchmarks" / "cuda-check"
    rows = read_runs([folder / "rows-run1.jsonl", folder / "rows-run2.jsonl"])
    tables = markdown(rows)
    assert tables == (folder / "tables.md").read_text()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    shown = re.search(r"<!-- gpu-check:start -->\n(.*)\n<!-- gpu-check:end -->", page, flags=re.S).group(1)
    assert shown.strip() == tables.strip()
    assert {r["device"] for r in rows} == {"NVIDIA H200"}
    # the ranges the prose quotes, recomputed from the rows
    speeds: dict[tuple, dict[str, float]] = {}
    for row in rows:
        if row["stage"] == "attention" and "img_s" in row:
            speeds.setdefault(tuple(row[k] for k in ("model", "tokens", "groups", "heads", "head_dim")), {})[
                row["kernel"]] = row["img_s"]
    for other, quoted in (("xformers", "by {}x"), ("math", "`math` by {}x")):
        ratios = [s["sdpa"] / s[other] for key, s in speeds.items() if other in s and key[0] != "sret_s"]
        assert quoted.format(f"{min(ratios):.1f}-{max(ratios):.1f}") in " ".join(page.split())
    ratios = [s["sdpa"] / s["xformers"] for s in speeds.values() if "xformers" in s]
    assert min(ratios) > 1.0  # the auto rule: sdpa before xformers at every measured shape


def test_gpu_check_runs_what_no_gpu_run_has_measured_first(tmp_path):
    from benchmarks.gpu_check import stages
    from benchmarks.gpu_step import STAGES

    names = [stage.name for stage in stages(tmp_path, dry_run=False)]
    assert names[:5] == ["compiled-sret", "compiled-deit", "inference", "mfu", "tests"]
    assert sorted(set(names) & set(STAGES)) == sorted(STAGES) and len(names) == len(set(names))
