"""What a user sees on a normal run: a header, no progress-bar flood in logs, clear smoke runs."""

from train_helpers import write_tiny_recipe
from vitblocks.train.__main__ import main as train_main


def test_a_run_logged_to_a_file_has_a_header_and_one_line_per_epoch_without_a_progress_bar(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert train_main([recipe, "--set", "epochs=2"]) == 0  # stderr is captured: not a terminal
    out, err = capsys.readouterr()
    assert "\r" not in err and "epoch 1/2" not in err  # no bar
    header = out.splitlines()[:5]
    assert header[0].startswith("model    sret_t: ") and "parameters" in header[0] and "GMACs" in header[0]
    assert "synthetic" in header[1] and "4 classes" in header[1]
    assert "cpu" in header[2] and "fp32" in header[2] and "attention backend auto" in header[2]
    assert header[3].startswith("step     compile=none (model.compile=False); AdamW")
    assert str(tmp_path / "run") in header[4]
    assert sum(line.startswith("epoch=") for line in out.splitlines()) == 2


def test_smoke_says_it_trains_on_synthetic_data(tmp_path, capsys):
    recipe = write_tiny_recipe(tmp_path, tmp_path / "run")
    assert train_main([recipe, "--smoke"]) == 0
    assert train_main([recipe, "--smoke"]) == 0  # a smoke folder is a check: rerunning it is fine
    assert "smoke test: sret_t on synthetic data of the recipe's shape (32 px, 4 classes)" in capsys.readouterr().out


def test_trainer_messages_are_log_records_of_rank_zero_by_default(capsys):
    import logging

    from vitblocks.train.process.logs import console_logging, logger

    console_logging(rank=1, world_size=2)
    assert not logger.isEnabledFor(logging.INFO)  # other ranks stay quiet
    console_logging(rank=1, world_size=2, all_ranks=True)
    assert logger.isEnabledFor(logging.INFO)
    console, = [h for h in logger.handlers if type(h).__name__ == "_StdoutHandler"]
    assert console.formatter.format(logging.makeLogRecord({"msg": "x"})) == "[rank 1] x"
    console_logging(rank=0, world_size=1)
    console, = [h for h in logger.handlers if type(h).__name__ == "_StdoutHandler"]
    assert console.formatter.format(logging.makeLogRecord({"msg": "x"})) == "x"
    logger.info("epoch=1 val_top1=50")
    assert capsys.readouterr().out == "epoch=1 val_top1=50\n"

    records = []
    own = logging.Handler()
    own.emit = records.append
    logger.addHandler(own)  # an application's own handler receives the records too
    try:
        console_logging(rank=0, world_size=1)
        logger.info("to the application")
        assert [r.getMessage() for r in records] == ["to the application"]
        assert capsys.readouterr().out == "to the application\n"
    finally:
        logger.removeHandler(own)
