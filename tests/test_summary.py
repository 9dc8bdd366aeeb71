import re
from pathlib import Path

import pytest
import timm

from vitblocks.summary import ZOO_MARKERS, main, paper_top1, summarize, update_between_markers, zoo_table

DOCS = Path(__file__).parents[1] / "docs"


def test_cli_prints_parts_and_total(capsys):
    main(["sret_t", "--img-size", "224"])
    out = capsys.readouterr().out
    assert out.startswith("sret_t @ 224x224")
    assert re.search(r"stages\.1\s+1,258,660\s+0\.485", out)
    assert re.search(r"total\s+4,755,979\s+1\.112", out)


def test_cli_at_another_resolution_resizes_the_position_map(capsys):
    main(["sret_t_unsliced", "--img-size", "384"])
    assert re.search(r"total\s+4,853,259\s+6\.408", capsys.readouterr().out)


def test_unknown_model_suggests_close_names():
    with pytest.raises(SystemExit, match="no registered model matches 'sret_tt'.*sret_t"):
        main(["sret_tt"])


def test_summary_works_for_plain_timm_models():
    total = summarize(timm.create_model("deit_tiny_patch16_224"))[-1]
    assert total.params == 5_717_416
    assert abs(total.macs / 1e9 - 1.26) < 0.01


@pytest.mark.slow  # counts every registered model
def test_docs_model_zoo_table_is_current():
    text = (DOCS / "models.md").read_text()
    start, end = (re.escape(m) for m in ZOO_MARKERS)
    documented = re.search(f"{start}\n(.*)\n{end}", text, flags=re.S).group(1)
    assert documented == zoo_table(timm.list_models("sret*", include_tags=True), paper_top1()), (
        "docs/models.md is stale: run python -m vitblocks.summary 'sret*' --zoo --tags --update docs/models.md"
    )
    assert "| `sret_t.distill_in1k` | 4,755,979 | 1.112 | 224 | 77.6 |" in documented


@pytest.mark.slow  # counts every registered model
def test_docs_plugged_table_is_current_and_its_example_runs():
    text = (DOCS / "plugged.md").read_text()
    start, end = (re.escape(m) for m in ZOO_MARKERS)
    documented = re.search(f"{start}\n(.*)\n{end}", text, flags=re.S).group(1)
    listed = re.findall(r"^\| `([^`]+)`", documented, flags=re.M)  # the page itself orders its rows
    from vitblocks.models.plugged_variants import VARIANTS

    assert set(VARIANTS) | {base for base, _ in VARIANTS.values()} == set(listed)
    assert documented == zoo_table(listed, paper_top1()), "docs/plugged.md is stale: regenerate its table"
    assert "| `deit_tiny_patch16_224` | 5,717,416 | 1.254 |" in documented  # timm's own numbers for the base
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "docs/plugged.md", "exec"), {})


@pytest.mark.slow  # counts every registered model
def test_docs_sharing_table_is_current():
    from vitblocks.summary import SHARING_MARKERS, sharing_table

    text = (DOCS / "plugged.md").read_text()
    start, end = (re.escape(m) for m in SHARING_MARKERS)
    documented = re.search(f"{start}\n(.*)\n{end}", text, flags=re.S).group(1)
    bases = list(dict.fromkeys(re.findall(r"^\| `([^`]+)`", documented, flags=re.M)))
    assert bases == ["deit_tiny_patch16_224", "pit_ti_224", "swin_tiny_patch4_window7_224"]
    assert documented == sharing_table(bases), (
        "docs/plugged.md is stale: run python -m vitblocks.summary deit_tiny_patch16_224 pit_ti_224 "
        "swin_tiny_patch4_window7_224 --sharing --update docs/plugged.md"
    )
    assert "| `deit_tiny_patch16_224` | cycle, x2 | — | 6 / 12 | 3,048,232 | 1.254 |" in documented


def test_update_between_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"before\n{ZOO_MARKERS[0]}\nold\n{ZOO_MARKERS[1]}\nafter\n")
    update_between_markers(page, "| new |")
    assert page.read_text() == f"before\n{ZOO_MARKERS[0]}\n| new |\n{ZOO_MARKERS[1]}\nafter\n"
    (tmp_path / "plain.md").write_text("no markers")
    with pytest.raises(SystemExit, match="no <!-- zoo:start -->"):
        update_between_markers(tmp_path / "plain.md", "x")


def test_cli_counts_a_routed_model_at_its_capacity(capsys):
    def total(*kwargs):
        main(["sret_t", "--img-size", "64", "--model-kwargs", "groups=((8,1),(4,1),(1,1))", *kwargs])
        params, gmacs = re.search(r"total\s+([\d,]+)\s+([\d.]+)", capsys.readouterr().out).groups()
        return int(params.replace(",", "")), float(gmacs)

    static, full, half = total(), total("routing={'capacity': 1.0}"), total("routing={'capacity': 0.5}")
    assert full == static  # capacity 1.0: no router, the same calls
    assert half[0] > static[0] and half[1] < 0.8 * static[1]  # routers added; the routed loops count half the tokens
    with pytest.raises(SystemExit, match="--model-kwargs 'routing' is not KEY=VALUE"):
        main(["sret_t", "--model-kwargs", "routing"])
