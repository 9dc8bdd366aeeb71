"""What a user sees on a normal run: a header, no progress-bar flood in logs, clear smoke runs."""

from train_helpers import write_tiny_recipe
from vitblocks.train.__main__ import main as train_main


def test_a_run_logged_to_a_file_has_a_header_and_one_line_per_epoch_without_a_progress_bar(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert train_main([recipe, "--set", "epochs=2"]) == 0  # stderr is captured: not a terminal
    out, err = capsys.readouterr()
    assert "\r" not in err and "epoch 1/2" not in err  # no bar
    header = out.splitlines()[:4]
    assert header[0].startswith("model    sret_t: ") and "parameters" in header[0] and "GMACs" in header[0]
    assert "synthetic" in header[1] and "4 classes" in header[1]
    assert "cpu" in header[2] and "fp32" in header[2] and "attention backend auto" in header[2]
    assert str(tmp_path / "run") in header[3]
    assert sum(line.startswith("epoch=") for line in out.splitlines()) == 2


def test_smoke_says_it_trains_on_synthetic_data(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert train_main([recipe, "--smoke"]) == 0
    assert train_main([recipe, "--smoke"]) == 0  # a smoke folder is a check: rerunning it is fine
    assert "smoke test: sret_t on synthetic data of the recipe's shape (32 px, 4 classes)" in capsys.readouterr().out
