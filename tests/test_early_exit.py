"""Early exit of whole images (`EarlyExit`): exact when none stops, equal to a per-image reference when
some do, trained with a loss at each exit, and set at evaluation with --exit-threshold."""

import pytest
import timm
import torch

import vitblocks  # noqa: F401 (registers the models)
from vitblocks.layers import EarlyExit, exit_logits, set_exit_threshold

SMALL = dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 3), groups=((4, 1), (1,), (1,)),
             mlp_ratio=2.0, img_size=32, num_classes=4)


def sret(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("sret_t", **SMALL, **kwargs).double().eval()
    with torch.no_grad():  # a head that is confident about some images and not others
        model.head.weight.mul_(10)
    return model


def per_image_reference(model, x, threshold):
    """Every image through every position (no exit), then each image's logits at its first confident exit."""
    stage, logits = model.stages[-1], []
    with torch.no_grad():
        tokens = model.stages[1](model.stages[0](model._stem(x)))
        tokens = stage.downsample(tokens)
        height, width = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        for layer in stage.blocks:
            draws = layer.draw(tokens)
            for position in range(layer.positions):
                tokens = layer.apply_position(tokens, position, draws)
                as_map = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
                logits.append(model.forward_head(as_map))
    chosen = []
    for image in range(x.shape[0]):
        exits = [step[image] for step in logits[:-1] if step[image].softmax(-1).max() >= threshold]
        chosen.append(exits[0] if exits else logits[-1][image])
    return torch.stack(chosen), logits


@pytest.mark.parametrize("routing", [None, {"mode": "token"}])  # token-choice: the depths follow the kept images
def test_stopped_images_have_their_exit_logits_and_the_rest_of_the_batch_runs_on(routing):
    kwargs = {} if routing is None else {"routing": routing}
    static, exiting = sret(**kwargs), sret(early_exit={}, **kwargs)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    _, steps = per_image_reference(exiting, x, 2.0)
    best = torch.stack([step.softmax(-1).amax(-1) for step in steps[:-1]]).amax(0)  # each image's top confidence
    threshold = best.sort().values[3:5].mean().item()  # four images reach it at some exit, four never do
    expected, _ = per_image_reference(exiting, x, threshold)
    set_exit_threshold(exiting, threshold)
    seen = []
    block = exiting.stages[-1].blocks[2].block
    block.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        got = exiting(x)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        stopped = sum(exiting.early_exit.exited)
        assert stopped == 4, exiting.early_exit.exited
        assert seen and max(seen) < 8  # the last block runs on the images left
        assert exiting.early_exit.positions_run() < 6
        set_exit_threshold(exiting, 1.5)  # none stops: exactly the static model
        assert torch.equal(exiting(x), static(x))


def test_exit_logits_feed_training_with_their_weights():
    model = sret(early_exit={"after": (1, 3), "weight": 0.4}).train()
    out = model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    taken = exit_logits(model)
    assert [w for w, _ in taken] == [0.2, 0.2] and all(t.shape == out.shape and t.requires_grad for _, t in taken)
    assert exit_logits(model) == []  # taken once
    sum(t.sum() for _, t in taken).backward()
    assert model.stages[-1].blocks[0].block.attn.qkv.weight.grad.abs().sum() > 0  # through the exits' positions


@pytest.mark.parametrize("options, message", [
    ({"treshold": 0.9}, r"unknown option\(s\) treshold \(options: after, threshold, weight\)"),
    ({"threshold": 0}, "exit threshold must be a number > 0"),
    ({"weight": -1}, "weight must be a number >= 0"),
    ({"after": (2, 6)}, r"the layers have 6 positions \(0 to 5\); position 6 is not one of them"),
    ({"after": ()}, "after must list positions"),
])
def test_bad_exit_settings_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("sret_t", **SMALL, early_exit=options)


def test_a_model_without_exits_refuses_a_threshold():
    with pytest.raises(ValueError, match="has no early exits: build it with early_exit="):
        set_exit_threshold(timm.create_model("sret_t", **SMALL), 0.9)
    assert EarlyExit(threshold=3).threshold == 3.0


def test_the_trainer_adds_the_exit_losses_and_eval_takes_an_exit_threshold(tmp_path, monkeypatch, capsys):
    import vitblocks.train.run.engine as engine
    from train_helpers import TINY_SRET, tiny_config
    from vitblocks import eval as evaluation
    from vitblocks.train import ModelConfig, Trainer

    taken = []

    def recording(model):
        found = exit_logits(model)
        taken.append(len(found))
        return found

    monkeypatch.setattr(engine, "exit_logits", recording)
    kwargs = dict(TINY_SRET, unique_blocks=(1, 1, 2), early_exit={"weight": 0.3})
    Trainer(tiny_config(tmp_path, epochs=1, model=ModelConfig("sret_t", kwargs=kwargs))).fit(progress=False)
    assert taken and set(taken) == {3}  # 4 positions in the last stage: an exit after each but the last
    assert evaluation.main([str(tmp_path / "last.pth"), "--exit-threshold", "0.01"]) == 0
    assert "early exit: 1.00 of 4 block applications per image" in capsys.readouterr().out  # all stop at once
    assert evaluation.main([str(tmp_path / "last.pth"), "--exit-threshold", "0"]) == 2
    assert "error: exit threshold must be a number > 0" in capsys.readouterr().err


def test_training_with_exits_keeps_the_stacks_checkpointing_and_the_model_copies(monkeypatch):
    import copy

    import vitblocks.layers.early_exit as early_exit

    calls = []
    real = early_exit.checkpoint
    monkeypatch.setattr(early_exit, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain, checkpointed = sret(early_exit={}), sret(early_exit={}, grad_checkpointing=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(5)
        (model(x).sum() + sum(t.sum() for _, t in exit_logits(model))).backward()
    assert len(calls) == 6  # every position of the last stage, recomputed in the backward pass
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=0)
    checkpointed(x)  # exit logits left untaken: a copy (EMA) leaves them behind
    assert copy.deepcopy(checkpointed).early_exit.pending == []


def test_exits_need_a_classifier_and_the_summary_refuses_kwargs_it_would_not_use():
    from vitblocks.summary import main

    with pytest.raises(ValueError, match="early_exit needs a classifier"):
        timm.create_model("sret_t", **{**SMALL, "num_classes": 0}, early_exit={})
    with pytest.raises(SystemExit, match="--model-kwargs applies to the per-part tables"):
        main(["sret_t", "--zoo", "--model-kwargs", "early_exit={}"])
