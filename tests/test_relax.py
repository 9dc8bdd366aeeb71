"""Relaxed recursion (per-loop LoRA, norms, biases) and conversion of trained models."""

import copy
import warnings

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import vitblocks  # noqa: F401  (registers the models)
from tests.checkpointing import assert_checkpointing_changes_nothing
from vitblocks.layers import (
    LoopLayerNorm,
    LoopLoRALinear,
    Recursive,
    RelaxedBlock,
    SharedSequence,
    TransformerBlock,
    compile_regions,
    relax_recursion,
)
from vitblocks.models import convert_to_recursive, load_base_weights, make_recursive


def tiny_vit(depth=6):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, embed_dim=32,
                             num_heads=2, num_classes=10)


def trained_like(model, scale=0.05, seed=0):
    """Give every layer its own weights, as training would (timm initialises some alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return model.eval()


IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("share", ["consecutive", "cycle", (0, 1, 0, 2, 1, 2)])
def test_rank_zero_is_plain_sharing_bitwise(share):
    plain = trained_like(tiny_vit())
    relaxed = copy.deepcopy(plain)
    options = dict(share=share, mix="per_loop", groups=(2, 1), eval_permutation="fixed")
    torch.manual_seed(0)  # the same mix layers for both
    make_recursive(plain, **options)
    torch.manual_seed(0)
    make_recursive(relaxed, **options, relax={"rank": 0})
    assert all(isinstance(m, RelaxedBlock) for m in relaxed.modules() if type(m).__name__ == "RelaxedBlock")
    assert sum(isinstance(m, RelaxedBlock) for m in relaxed.modules()) == 3
    assert sum(p.numel() for p in relaxed.parameters()) == sum(p.numel() for p in plain.parameters())
    assert torch.equal(plain(IMAGES), relaxed(IMAGES))


def test_fresh_corrections_start_at_zero_so_relaxing_changes_nothing():
    torch.manual_seed(0)
    stage = Recursive(TransformerBlock(dim=32, num_heads=2, groups=(4, 2)), loops=3).eval()
    x = torch.randn(2, 16, 32)
    before = stage(x)
    assert relax_recursion(stage, rank=4, norms=True, biases=True) == 1
    assert isinstance(stage.block, RelaxedBlock)
    assert torch.equal(stage(x), before)
    linears = [m for m in stage.modules() if isinstance(m, LoopLoRALinear)]
    norms = [m for m in stage.modules() if isinstance(m, LoopLayerNorm)]
    assert len(linears) == 4 and len(norms) == 2
    assert relax_recursion(stage, rank=4) == 0  # already relaxed


def test_each_loop_gets_its_own_correction_and_gradients():
    torch.manual_seed(0)
    block = RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, rank=2)
    stage = Recursive(block, loops=2)
    qkv = block.shared.attn.qkv
    with torch.no_grad():
        qkv.lora_up[1].normal_()
    x = torch.randn(2, 16, 32)
    stage.eval()
    block.select_loop(0)
    y0 = block.shared(x, loop=0)
    block.select_loop(1)
    expected = block.shared(y0, loop=1)
    assert torch.allclose(stage(x), expected)
    stage.train()
    stage(x).sum().backward()
    assert qkv.lora_down.grad[0].abs().sum() == 0  # loop 0's up-projection is zero: no gradient reaches its down
    assert qkv.lora_down.grad[1].abs().sum() > 0 and qkv.lora_up.grad[0].abs().sum() > 0


def test_bad_relaxations_are_refused_clearly():
    with pytest.raises(ValueError, match=r"rank 40 is above the full rank of attn.qkv \(96x32: at most 32\)"):
        RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, rank=40)
    with pytest.raises(ValueError, match=r"no linear of TransformerBlock is named one of \('q',\)"):
        RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, rank=2, targets=("q",))
    with pytest.raises(ValueError, match="rank must be an int >= 0 or 'full'"):
        RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, rank=-1)
    with pytest.raises(ValueError, match="has no timm LayerScale"):
        RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, layer_scale=True)
    with pytest.raises(ValueError, match="rank 33 is above the full rank"):
        make_recursive(tiny_vit(), share="cycle", relax={"rank": 33})
    with pytest.raises(ValueError, match="has no Recursive or SharedSequence layer"):
        relax_recursion(tiny_vit(), rank=2)
    with pytest.raises(ValueError, match=r"init='last' is not one of"):
        convert_to_recursive(tiny_vit(), init="last")


@pytest.mark.parametrize("share", ["cycle", "consecutive", (0, 1, 2, 1, 0, 2)])
@pytest.mark.parametrize("init", ["first", "average", "stepwise"])
def test_full_rank_conversion_reproduces_the_base(share, init):
    model = trained_like(tiny_vit())
    expected = model(IMAGES)
    report = convert_to_recursive(model, share=share, init=init, rank="full")
    assert report.weight_error < 1e-6
    assert (model(IMAGES) - expected).abs().max() <= 1e-4


def test_full_rank_conversion_of_pit_and_layer_scale_vit():
    pit = trained_like(timm.create_model("pit_ti_224", img_size=128, num_classes=10))
    images = torch.randn(2, 3, 128, 128)
    expected = pit(images)
    convert_to_recursive(pit, share=((0, 0), (0, 1, 2, 0, 1, 2), (0, 1, 0, 1)), init="average", rank="full")
    assert (pit(images) - expected).abs().max() <= 1e-4
    vit = trained_like(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, embed_dim=32,
                                         num_heads=2, init_values=0.1))
    expected = vit(IMAGES)
    convert_to_recursive(vit, share="cycle", rank="full", layer_scale=True)
    assert (vit(IMAGES) - expected).abs().max() <= 1e-4


def test_error_shrinks_as_the_rank_grows_and_parameters_are_exact():
    base = trained_like(tiny_vit(), scale=0.2)
    expected = base(IMAGES)
    dim, hidden, depth, unique = 32, 128, 6, 3
    block = sum(p.numel() for p in base.blocks[0].parameters())
    outside = sum(p.numel() for p in base.parameters()) - depth * block
    errors, logit_errors = [], []
    for rank in (0, 2, 8, 16, "full"):
        model = copy.deepcopy(base)
        report = convert_to_recursive(model, share="cycle", init="average", rank=rank)
        errors.append(report.weight_error)
        with torch.no_grad():
            logit_errors.append(float((model(IMAGES) - expected).abs().max()))
        r = dim if rank == "full" else rank
        lora = r * ((dim + 3 * dim) + (dim + dim) + (dim + hidden) + (hidden + dim))  # qkv, proj, fc1, fc2
        per_use = lora + (3 * dim + dim + hidden + dim) + 2 * 2 * dim  # + bias offsets + two norms' offsets
        assert report.parameters_before == outside + depth * block
        assert report.parameters_after == outside + unique * block + depth * per_use
        assert report.parameters_after == sum(p.numel() for p in model.parameters())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert logit_errors[-1] <= 1e-4 < logit_errors[0] and logit_errors[-1] < min(logit_errors[:-1]), logit_errors


@pytest.mark.parametrize("mix", ["none", "per_loop"])
def test_relaxed_models_save_and_load(tmp_path, mix):
    torch.manual_seed(0)
    model = trained_like(tiny_vit())
    convert_to_recursive(model, share=(0, 1, 0, 1, 2, 2), rank=4, mix=mix)
    expected = model(IMAGES)
    twin = tiny_vit()
    convert_to_recursive(twin, share=(0, 1, 0, 1, 2, 2), rank=4, mix=mix)
    assert not torch.equal(twin.eval()(IMAGES), expected)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    twin.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert torch.equal(twin(IMAGES), expected)
    torch.save(model.state_dict(), tmp_path / "model.pth")
    third = tiny_vit()
    convert_to_recursive(third, share=(0, 1, 0, 1, 2, 2), rank=4, mix=mix)
    third.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    assert torch.equal(third.eval()(IMAGES), expected)


def test_relaxed_models_trace_export_and_checkpoint():
    torch.manual_seed(0)
    model = trained_like(tiny_vit())
    convert_to_recursive(model, share="cycle", rank=4, groups=(2, 1), eval_permutation="fixed")
    expected = model(IMAGES)
    assert torch.equal(torch.fx.symbolic_trace(model)(IMAGES), expected)
    assert torch.allclose(torch.export.export(model, (IMAGES,)).module()(IMAGES), expected, atol=1e-6)
    assert_checkpointing_changes_nothing(model, IMAGES, seed=2)


@pytest.mark.slow  # compiles
def test_relaxed_blocks_compile_as_regions():
    torch.manual_seed(0)
    stage = Recursive(RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, rank=2, norms=True), loops=2)
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, LoopLoRALinear):
                m.lora_up.normal_()
    stage.eval()
    x = torch.randn(2, 16, 32)
    expected = stage(x)
    compile_regions(stage)
    assert torch.allclose(stage(x), expected, atol=1e-5)


def test_blocks_used_once_are_not_relaxed_and_the_plan_knows():
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2, 4, 2), num_heads=(1, 2, 2, 4))
    base = swin.state_dict()
    plan = make_recursive(swin, loops=2, share="cycle", relax={"rank": 2})
    assert not isinstance(swin.layers[0].blocks[0].block, RelaxedBlock)  # one block pair: nothing shared
    assert isinstance(swin.layers[2].blocks[0].block, RelaxedBlock)
    assert plan.block_paths["layers.0.blocks.1"] == "layers.0.blocks.0.block.1"
    assert plan.block_paths["layers.2.blocks.1"] == "layers.2.blocks.0.block.shared.1"
    report = load_base_weights(swin, base, plan)
    assert not [key for key in report.new if "lora" not in key]
    vit = tiny_vit()
    plan = make_recursive(vit, share=(1, 1, 0, 0, 2, 2), relax={"rank": 2})
    assert plan.applications["blocks.1"] == ("blocks.0.block.shared", 1)
    assert not [key for key in load_base_weights(vit, tiny_vit().state_dict(), plan).new if "lora" not in key]


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=4, max_size=4).filter(lambda a: set(a) == set(range(max(a) + 1))),
       st.sampled_from(["first", "average", "stepwise"]))
def test_any_assignment_converts_exactly_at_full_rank(assignment, init):
    model = trained_like(tiny_vit(depth=4), seed=len(assignment))
    expected = model(IMAGES)
    report = convert_to_recursive(model, share=tuple(assignment), init=init, rank="full")
    assert report.parameters_after == sum(p.numel() for p in model.parameters())
    assert (model(IMAGES) - expected).abs().max() <= 1e-4


def test_torchscript_script_refuses_each_shared_layer_by_name_and_tracing_works():
    x = torch.randn(2, 16, 32)
    sequence = SharedSequence([TransformerBlock(dim=32, num_heads=2) for _ in range(2)], (0, 1, 0, 1))
    relaxed = RelaxedBlock(TransformerBlock(dim=32, num_heads=2), loops=2, rank=2)
    for layer, name in ((sequence, "SharedSequence"), (Recursive(relaxed, loops=2), "Recursive"),
                        (relaxed, "RelaxedBlock"), (relaxed.shared, "TransformerBlock"),
                        (relaxed.shared.attn, "SlicedGroupAttention")):
        with warnings.catch_warnings():  # torch deprecates torch.jit.script itself
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(RuntimeError, match=rf"^{name} cannot be compiled by torch.jit.script .*torch.export"):
                torch.jit.script(layer)
    for layer in (sequence, Recursive(relaxed, loops=2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.allclose(torch.jit.trace(layer.eval(), x)(x), layer(x), atol=1e-6)  # tracing works


def test_a_refused_relaxation_changes_nothing():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for relax, message in (({"rank": 33}, "rank 33 is above the full rank"),
                            ({"rank": 2, "dropout": 0.1}, r"relax: unknown option\(s\) \['dropout'\]"),
                            ({"rank": 2, "layer_scale": True}, "has no timm LayerScale")):
        with pytest.raises(ValueError, match=message):
            make_recursive(model, share="cycle", relax=relax)
        assert isinstance(model.blocks[0], timm.models.vision_transformer.Block)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    block = TransformerBlock(dim=32, num_heads=2)
    with pytest.raises(ValueError, match="has no timm LayerScale"):
        RelaxedBlock(block, loops=2, rank=2, norms=True, layer_scale=True)
    assert type(block.attn.qkv) is torch.nn.Linear and type(block.norm1) is torch.nn.LayerNorm


def test_one_relaxation_object_is_taken_in_every_form_and_checks_itself():
    from dataclasses import FrozenInstanceError

    from vitblocks.layers import Relaxation

    relaxation = Relaxation(rank=2, targets="qkv", norms=True)
    assert relaxation.targets == ("qkv",) and relaxation.relaxes and not Relaxation().relaxes
    assert Relaxation.parse({"rank": 2, "targets": ["qkv"], "norms": True}) == relaxation
    assert Relaxation.parse(rank=2, targets=("qkv",), norms=True) == relaxation == Relaxation.parse(relaxation)
    with pytest.raises(FrozenInstanceError):
        relaxation.rank = 4
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['nroms'\] \(did you mean 'norms'\?\)"):
        Relaxation.parse({"nroms": True})
    with pytest.raises(ValueError, match="norms must be True or False, got 'yes'"):
        Relaxation(norms="yes")
    with pytest.raises(TypeError, match="give a relaxation or its options, not both"):
        RelaxedBlock(TransformerBlock(dim=32, num_heads=2), 2, relaxation, rank=4)
    # the same relaxation, given as an object, a dict or keywords, builds the same parameters
    shapes = []
    for form in ({"relaxation": relaxation}, {"relaxation": relaxation.as_dict()}, relaxation.as_dict()):
        torch.manual_seed(0)
        block = RelaxedBlock(TransformerBlock(dim=32, num_heads=2), 2, **form)
        shapes.append([(n, tuple(p.shape)) for n, p in block.named_parameters()])
        assert block.relaxation == relaxation
    assert shapes[0] == shapes[1] == shapes[2]
    # a conversion keeps each layer's norms and biases unless its relaxation says otherwise
    defaults = convert_to_recursive(tiny_vit(), share="cycle", rank=2)
    explicit = convert_to_recursive(tiny_vit(), share="cycle", relax=Relaxation(rank=2))
    assert defaults.parameters_after > explicit.parameters_after  # per-loop norm and bias offsets
    with pytest.raises(TypeError, match="not both"):
        convert_to_recursive(tiny_vit(), share="cycle", relax={"rank": 2}, rank=4)
