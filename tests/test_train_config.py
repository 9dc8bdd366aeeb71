import re
from pathlib import Path

import pytest
import torch

from vitblocks.train import ConfigError, TrainConfig, apply_overrides, load_recipe
from vitblocks.train.config.recipe import format_config, from_dict, to_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.py"))


def test_every_recipe_loads_and_round_trips_through_plain_data():
    assert {p.stem for p in RECIPES} >= {"quickstart", "sret_pit", "sret_lt", "sret_s", "sret_t_distill"}
    for path in RECIPES:
        config = load_recipe(path)
        assert from_dict(to_dict(config)) == config


def test_sret_pit_follows_the_papers_recipe():
    config = load_recipe(Path("recipes/sret_pit.py"))
    assert config.model.name == "sret_t" and config.optim.lr is None and config.optim.lr_per_512 == 1e-3
    assert config.schedule.warmup_epochs == 30 and config.epochs == 300 and config.schedule.min_lr == 1e-5
    assert (config.augment.mixup, config.augment.cutmix, config.augment.label_smoothing) == (0.8, 1.0, 0.1)
    assert config.augment.auto_augment.startswith("rand-m9-mstd0.5") and config.augment.re_prob == 0.25
    assert load_recipe(Path("recipes/sret_t_distill.py")).distill.kind == "soft"


def test_overrides_set_nested_fields_with_their_types():
    config = apply_overrides(TrainConfig(), ["optim.lr=1e-3", "epochs=5", "model.name=sret_s",
                                             "model.kwargs.drop_path_rate=0.2", "data.mean=(0.5, 0.5, 0.5)",
                                             "ema_decay=0.9998", "model.grad_checkpointing=sqrt",
                                             "optim.clip_grad=None"])
    assert config.optim.lr == 1e-3 and config.epochs == 5 and config.model.name == "sret_s"
    assert config.model.kwargs == {"drop_path_rate": 0.2} and config.data.mean == (0.5, 0.5, 0.5)
    assert config.ema_decay == 0.9998 and config.model.grad_checkpointing == "sqrt"
    assert apply_overrides(TrainConfig(), ["optim.lr=1"]).optim.lr == 1.0  # ints widen to float
    assert TrainConfig().model.kwargs == {}  # the defaults were not mutated


def test_unknown_key_names_it_and_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean optim\.lr"):
        apply_overrides(TrainConfig(), ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'; did you mean epochs"):
        apply_overrides(TrainConfig(), ["epoch=3"])


@pytest.mark.parametrize(
    "override, match",
    [("epochs=abc", "epochs='abc': expected int"), ("precision=fp8", "precision='fp8' is not one of"),
     ("data.batch_size=0", "data.batch_size=0 must be >= 1"), ("lr", "not of the form path=value"),
     ("distill.kind=soft", "needs distill.teacher")],
)
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(TrainConfig(), [override])


FREE_FORM = {"model.name", "model.kwargs", "model.convert", "data.dataset", "data.root", "data.train_split",
             "data.val_split", "augment.auto_augment", "optim.opt", "schedule.sched", "distill.teacher",
             "distill.teacher_checkpoint", "distill.teacher_kwargs", "logging.wandb", "output_dir"}
"""Fields whose values are names, paths or option dicts, checked by what they name (registries, files)."""


def test_every_number_and_switch_of_the_schema_declares_its_range_or_choices():
    from vitblocks.train.config.fields import leaf_fields

    undeclared = [path for path, _, f in leaf_fields(TrainConfig())
                  if path not in FREE_FORM and not {"range", "choices"} & f.metadata.keys()]
    assert not undeclared, f"fields without a declared rule: {undeclared}"
    assert FREE_FORM <= {path for path, _, _ in leaf_fields(TrainConfig())}  # no stale name here


@pytest.mark.parametrize("override, says", [
    ("optim.clip_grad=-1", "optim.clip_grad=-1.0 must be > 0"),
    ("schedule.warmup_lr=-0.01", "schedule.warmup_lr=-0.01 must be >= 0"),
    ("schedule.min_lr=-1e-5", "schedule.min_lr=-1e-05 must be >= 0"),
    ("augment.hflip=1.5", "augment.hflip=1.5 must be a probability"),
    ("augment.mixup_prob=-0.1", "augment.mixup_prob=-0.1 must be a probability"),
    ("augment.scale=(0.5, 0.1)", "augment.scale=(0.5, 0.1) must be (smallest, largest)"),
    ("augment.scale=0.5", "augment.scale='0.5': expected tuple"),
    ("augment.color_jitter=-0.4", "augment.color_jitter=-0.4 must be >= 0"),
    ("data.std=(0.2, 0.0, 0.2)", "data.std=(0.2, 0.0, 0.2) must be numbers > 0"),
    ("data.interpolation=cubic", "data.interpolation='cubic' is not one of"),
    ("data.synthetic_samples=0", "data.synthetic_samples=0 must be >= 1"),
    ("distill.temperature=0", "distill.temperature=0.0 must be > 0"),
    ("distill.alpha=2", "distill.alpha=2.0 must be in [0, 1]"),
    ("checkpoint.every_steps=-5", "checkpoint.every_steps=-5 must be >= 0"),
])
def test_numbers_that_would_train_backwards_or_divide_by_zero_are_refused(override, says):
    with pytest.raises(ConfigError) as refused:
        apply_overrides(TrainConfig(), [override])
    assert says in str(refused.value)


def test_a_stored_config_of_an_older_version_reads_its_old_values():
    stored = to_dict(TrainConfig())
    stored["optim"]["clip_grad"] = 0.0  # "no clipping" before clip_grad had to be > 0 or None
    assert from_dict(stored).optim.clip_grad is None


def test_recipe_without_config_is_refused(tmp_path):
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="must assign a vitblocks.train.TrainConfig to the name 'config'"):
        load_recipe(tmp_path / "r.py")
    with pytest.raises(FileNotFoundError, match="no recipe at"):
        load_recipe(tmp_path / "missing.py")


def run_main(capsys, *argv):
    """The trainer's command-line entry point, in this process (the real subprocess is tested in test_errors.py)."""
    from vitblocks.train.__main__ import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_print_config_shows_resolved_values(capsys):
    code, out, _ = run_main(capsys, "recipes/sret_pit.py", "--set", "optim.lr=0.002", "--print-config")
    assert code == 0
    assert "optim.lr = 0.002" in out and "model.name = 'sret_t'" in out
    assert out.strip() == format_config(apply_overrides(load_recipe("recipes/sret_pit.py"), ["optim.lr=0.002"]))


def test_missing_imagenet_explains_layout_override_and_quickstart(tmp_path, capsys):
    code, _, err = run_main(capsys, "recipes/sret_pit.py", "--set", f"data.root={str(tmp_path / 'imagenet')!r}",
                            f"output_dir={str(tmp_path / 'run')!r}")
    assert code == 2
    for expected in ("imagenet/train/<class name>/<image>.jpg", "does not exist", "--set data.root=",
                     "--smoke", "recipes/quickstart.py"):
        assert expected in err


def test_cli_unknown_key_exits_cleanly(capsys):
    code, _, err = run_main(capsys, "recipes/quickstart.py", "--set", "optim.lrr=1", "--print-config")
    assert code == 2 and "did you mean optim.lr" in err


def test_renamed_keys_point_to_their_new_name_and_old_stored_configs_still_load():
    from vitblocks.train.config.recipe import apply_overrides, from_dict, to_dict
    from vitblocks.train.errors import ConfigError

    config = load_recipe(Path("recipes/quickstart.py"))
    with pytest.raises(ConfigError, match="'model.attn_backend' is now 'model.backend'"):
        apply_overrides(config, ["model.attn_backend=math"])
    stored = to_dict(config)
    stored["model"]["attn_backend"] = stored["model"].pop("backend")
    stored["model"]["attn_backend"] = "math"
    assert from_dict(stored).model.backend == "math"


def test_derived_recipes_change_typed_fields_and_keep_one_source_per_hyperparameter():
    from vitblocks.train import derive

    base = load_recipe(Path("recipes/sret_t_imagenet.py"))
    assert load_recipe(Path("recipes/sret_pit.py")) == base  # the old name is the same recipe
    small = load_recipe(Path("recipes/sret_s.py"))
    assert (small.model.name, small.model.kwargs, small.epochs) == ("sret_s", {}, base.epochs)
    import timm

    assert timm.create_model("sret_s", img_size=64).stages[2].blocks[-1].block.drop_path1.keep_prob < 1.0
    swin = load_recipe(Path("recipes/swin_tiny_rec.py"))
    assert swin.model.kwargs == {"drop_path_rate": 0.2}
    derived = derive(base, model={"kwargs": {"loops": 3}}, optim={"lr": 5e-4})
    assert derived.model.kwargs == {"loops": 3} and derived.optim.lr == 5e-4 and base.optim.lr is None
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate'"):
        derive(base, optim={"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match=r"precision='fp8' is not one of"):
        derive(base, precision="fp8")


def test_names_are_checked_against_timm_when_building_not_on_every_derive():
    from unittest import mock

    from vitblocks.train import build_model, build_optimizer_and_schedule, derive
    from vitblocks.train.config.checks import check_names

    base = load_recipe(Path("recipes/quickstart.py"))
    with mock.patch("vitblocks.models.create.timm.create_model") as create:  # deriving builds nothing
        typo = derive(base, model={"kwargs": {"drop_pth_rate": 0.1}})
        assert derive(base, model={"name": "sret_tt"}).model.name == "sret_tt"
    assert not create.called
    with pytest.raises(ConfigError, match=r"model.kwargs.drop_pth_rate: sret_t takes no option 'drop_pth_rate'; "
                                          r"did you mean drop_path_rate"):
        build_model(typo)
    with pytest.raises(ConfigError, match="did you mean embed_dim"):
        check_names(apply_overrides(base, ["model.name=deit_tiny_rec_patch16_224", "model.kwargs={'embed_dims': 64}"]))
    with pytest.raises(ConfigError, match="model.name='sret_tt' is not a registered model; did you mean sret_t"):
        build_model(derive(base, model={"name": "sret_tt"}))
    with pytest.raises(ConfigError, match="optim.opt='adamww' is not one of timm's optimizers; did you mean adamw"):
        build_optimizer_and_schedule(torch.nn.Linear(2, 2), derive(base, optim={"opt": "adamww"}), 1)
    assert build_model(derive(base, model={"kwargs": {"loops": 3}})).stages[0].loops == 3


def test_smoke_config_lives_with_the_config():
    from vitblocks.train.config.recipe import smoke_config

    smoke = smoke_config(load_recipe(Path("recipes/sret_t_imagenet.py")))
    assert ((smoke.data.dataset, smoke.epochs, smoke.data.workers, smoke.augment.repeated_aug)
            == ("synthetic", 1, 0, False))
    assert smoke.output_dir.endswith("smoke")


def test_fields_declare_their_rules_and_overrides_are_derived():
    import dataclasses

    from vitblocks.train.config.fields import at_least_one, bounded, check_field_rules, choice
    from vitblocks.train.errors import ConfigError

    @dataclasses.dataclass
    class Section:
        mode: str = choice("a", ("a", "b"))
        rate: float | None = bounded(None, lambda v: 0 < v < 1, "must be in (0, 1)")
        count: int = at_least_one(1)

    check_field_rules(Section())  # None is "off" for a bounded field
    for section, message in ((Section(mode="c"), "mode='c' is not one of ('a', 'b')"),
                             (Section(rate=2.0), "rate=2.0 must be in (0, 1)"),
                             (Section(count=0), "count=0 must be >= 1"),
                             (Section(rate=float("nan")), "rate=nan is not a finite number")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_field_rules(section)
    config = load_recipe(Path(__file__).parents[1] / "recipes" / "quickstart.py")
    merged = apply_overrides(config, ["model.kwargs.drop_path_rate=0.2"])  # a key inside a dict field: merged
    assert merged.model.kwargs == {**config.model.kwargs, "drop_path_rate": 0.2}
    replaced = apply_overrides(config, ["model.kwargs={'drop_path_rate': 0.2}"])  # the whole field: replaced
    assert replaced.model.kwargs == {"drop_path_rate": 0.2}
    assert config.model.kwargs != merged.model.kwargs  # the base is not modified
