"""Test-time depth (`set_loops`, `vitblocks.eval --loops`) and uptraining converted models in the trainer."""

import pytest
import timm
import torch

import vitblocks  # noqa: F401  (registers the models)
from tests.train_helpers import tiny_config
from vitblocks.eval import main as eval_main
from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.io import CheckpointError
from vitblocks.layers import NonLinearMix, Recursive, RelaxedBlock, SharedSequence, TransformerBlock, set_loops
from vitblocks.layers.mix import mix_for_mode
from vitblocks.train import ConfigError, DistillConfig, ModelConfig, Trainer
from vitblocks.train.run.builders import build_model


def mixed_stage(mix, loops=2, relaxed=False):
    torch.manual_seed(0)
    block = TransformerBlock(dim=32, num_heads=2, groups=(4, 2), eval_permutation="fixed")
    if relaxed:
        block = RelaxedBlock(block, loops=loops, rank=2, norms=True)
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return Recursive(block, loops=loops, mix=mix_for_mode(mix, lambda: NonLinearMix(32))).eval()


def by_hand(stage, x, loops, trained):
    """Loop l applies the block at loop l, then loop min(l, trained - 1)'s mix layer."""
    for loop in range(loops):
        x = stage.block(x, loop=loop)
        if stage.mix is not None:
            x = stage.mix(x) if stage.shared_mix else stage.mix[min(loop, trained - 1)](x)
    return x


@pytest.mark.parametrize("mix", ["none", "shared", "per_loop"])
@pytest.mark.parametrize("relaxed", [False, True])
def test_more_and_fewer_loops_per_mix_mode(mix, relaxed):
    stage = mixed_stage(mix, relaxed=relaxed)
    x = torch.randn(2, 16, 32)
    trained = stage(x)
    for loops in (1, 3, 5):
        stage.set_loops(loops)
        assert torch.equal(stage(x), by_hand(stage, x, loops, trained=2))
    stage.set_loops(2)
    assert torch.equal(stage(x), trained)  # nothing was re-initialised
    if relaxed:  # later loops reuse the last trained loop's corrections
        qkv = stage.block.shared.attn.qkv
        qkv.active_loop = 7
        reference = torch.nn.functional.linear(x, qkv.loop_weight(1), qkv.bias)
        assert torch.allclose(qkv(x), reference, atol=1e-6)


def test_exported_recursion_follows_test_time_depth():
    stage = mixed_stage("per_loop").eval()
    stage.set_loops(4)
    x = torch.randn(2, 16, 32)
    assert torch.allclose(torch.export.export(stage, (x,)).module()(x), stage(x), atol=1e-6)


def test_cycles_repeat_and_reuse_the_last_cycles_mix_layers():
    torch.manual_seed(0)
    blocks = [TransformerBlock(dim=32, num_heads=2) for _ in range(2)]
    stack = SharedSequence(blocks, (0, 1, 0, 1), mix=lambda: NonLinearMix(32)).eval()
    x = torch.randn(2, 16, 32)
    trained = stack(x)
    stack.set_loops(3)
    assert stack.assignment == (0, 1) * 3
    expected = x
    for position, (index, mix) in enumerate(zip((0, 1) * 3, (0, 1, 2, 3, 2, 3))):
        expected = stack.mix[mix](blocks[index](expected, loop=position // 2))
    assert torch.equal(stack(x), expected)
    stack.set_loops(2)
    assert torch.equal(stack(x), trained)
    with pytest.raises(ValueError, match="set_loops needs a cycle schedule"):
        SharedSequence(blocks, (0, 0, 1)).set_loops(2)


def test_models_take_test_time_depth():
    torch.manual_seed(0)
    images = torch.randn(1, 3, 64, 64)
    for name, kwargs in (("sret_t", {}), ("sret_t", {"share": "cycle", "mix": "shared"}),
                         ("deit_tiny_shared_patch16_224", {})):
        model = timm.create_model(name, img_size=64, **kwargs).eval()
        trained = model(images)
        set_loops(model, 3)
        deeper = model(images)
        assert deeper.shape == trained.shape and not torch.equal(deeper, trained)
        set_loops(model, 2)
        assert torch.equal(model(images), trained)
    with pytest.raises(ValueError, match="loops must be an int >= 1"):
        set_loops(model, 0)
    with pytest.raises(ValueError, match="test-time depth applies to weight-shared models"):
        set_loops(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2), 2)


VIT = dict(patch_size=8, depth=4, embed_dim=32, num_heads=2)


def test_uptraining_a_converted_model_by_distillation_and_evaluating_deeper(tmp_path, capsys):
    base = Trainer(tiny_config(tmp_path / "base", model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT)),
                               epochs=1))
    base.fit(progress=False)
    checkpoint = str(tmp_path / "base" / "last.pth")
    convert = {"base_checkpoint": checkpoint, "share": "cycle", "init": "average", "rank": 2}
    config = tiny_config(
        tmp_path / "uptrain", epochs=1,
        model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT), convert=convert),
        distill=DistillConfig(kind="soft", teacher="vit_tiny_patch16_224", teacher_checkpoint=checkpoint,
                              teacher_kwargs=dict(VIT, img_size=32)),
    )
    model = build_model(config)
    assert isinstance(model.blocks[0], SharedSequence) and len(model.blocks[0].blocks) == 2
    base_state = torch.load(checkpoint, weights_only=True)["model"]
    assert torch.equal(model.blocks[0].blocks[1].shared.norm1.weight,
                       (base_state["blocks.1.norm1.weight"] + base_state["blocks.3.norm1.weight"]) / 2)
    Trainer(config).fit(progress=False)
    capsys.readouterr()
    path = str(tmp_path / "uptrain" / "last.pth")
    as_trained = evaluate_checkpoint(path)
    assert evaluate_checkpoint(path, loops=2) == as_trained
    assert evaluate_checkpoint(path, loops=3)["val_loss"] != as_trained["val_loss"]
    assert eval_main([path, "--loops", "3"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert eval_main([path, "--loops", "0"]) == 2
    assert "loops must be an int >= 1" in capsys.readouterr().err


def test_conversion_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="model.convert.rnk is not a conversion option; did you mean rank"):
        tiny_config(tmp_path, model=ModelConfig("vit_tiny_patch16_224", convert={"base_checkpoint": "x", "rnk": 2}))
    with pytest.raises(ConfigError, match="model.convert needs base_checkpoint: .* or None to convert the weights"):
        tiny_config(tmp_path, model=ModelConfig("vit_tiny_patch16_224", convert={"rank": 2}))
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    config = tiny_config(tmp_path, model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT),
                                                     convert={"base_checkpoint": str(tmp_path / "broken.pth")}))
    with pytest.raises(CheckpointError, match="broken.pth"):
        build_model(config)
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, **dict(VIT, depth=2)).state_dict(),
               tmp_path / "other.pth")
    config = tiny_config(tmp_path, model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT),
                                                     convert={"base_checkpoint": str(tmp_path / "other.pth")}))
    with pytest.raises(CheckpointError, match="do not fit the model to convert"):
        build_model(config)
    config = tiny_config(tmp_path, model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT),
                                                     convert={"base_checkpoint": "x", "rank": 99}))
    with pytest.raises(ConfigError, match="rank 99 is above the full rank"):
        build_model(config, load_base=False)


def test_per_loop_offsets_are_exempt_from_weight_decay(tmp_path):
    from vitblocks.train.run.builders import build_optimizer_and_schedule

    config = tiny_config(tmp_path, model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT),
                                                     convert={"base_checkpoint": None, "rank": 2}))
    model = build_model(config)
    optimizer, _, _ = build_optimizer_and_schedule(model, config, updates_per_epoch=1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "blocks.0.blocks.0.shared.attn.qkv.bias_delta" in exempt
    assert "blocks.0.blocks.0.shared.norm1.weight_delta" in exempt and "pos_embed" in exempt
    assert "blocks.0.blocks.0.shared.attn.qkv.lora_down" in decayed
    assert "blocks.0.blocks.0.shared.attn.qkv.weight" in decayed
