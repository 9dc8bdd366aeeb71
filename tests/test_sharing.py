"""Sharing schedules: consecutive, cycle and explicit assignments, in layers, SReT and timm models."""

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vitblocks  # noqa: F401  (registers the models)
from tests.checkpointing import assert_checkpointing_changes_nothing
from vitblocks.layers import NonLinearMix, Recursive, RelaxedBlock, SharedSequence, TransformerBlock, sharing_assignment
from vitblocks.layers.sharing import check_assignment, is_consecutive, loop_indices, runs_of
from vitblocks.models.plug import load_base_weights, make_recursive, recursion_plan_of


def tiny_vit(depth=6, **kwargs):
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth, embed_dim=32,
                             num_heads=2, **kwargs)


def tiny_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(2, 2, 4, 2), num_heads=(1, 2, 2, 4))


def shared_units(model):
    """Per stack: the unique units (the modules that hold weights), in the order of their index."""
    units = {}
    for name, stack in model.named_modules():
        if name.split(".")[-1] != "blocks" or not isinstance(stack, nn.Sequential):
            continue
        layers = list(stack)
        if len(layers) == 1 and isinstance(layers[0], SharedSequence):
            units[name] = list(layers[0].blocks)
        elif all(isinstance(layer, Recursive) for layer in layers):
            units[name] = [layer.block for layer in layers]
    return units


def executed_units(model, x):
    """Per stack: the index of the unique unit each application ran, in order (forward pre-hooks)."""
    calls, handles = {}, []
    for stack, units in shared_units(model).items():
        calls[stack] = []
        for index, unit in enumerate(units):
            handles.append(unit.register_forward_pre_hook(lambda m, a, s=stack, i=index: calls[s].append(i)))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return calls


def test_named_schedules():
    assert sharing_assignment("consecutive", 6, loops=2) == (0, 0, 1, 1, 2, 2)
    assert sharing_assignment("cycle", 6, loops=2) == (0, 1, 2, 0, 1, 2)
    assert sharing_assignment("cycle", 9, loops=3) == (0, 1, 2, 0, 1, 2, 0, 1, 2)
    assert sharing_assignment("consecutive", 5, loops=2) == (0, 0, 1, 1, 2)  # a short last run
    assert sharing_assignment("cycle", 5, loops=2) == (0, 1, 2, 0, 1)
    assert sharing_assignment((0, 1, 0, 1, 2, 2), 6) == (0, 1, 0, 1, 2, 2)
    assert loop_indices((0, 1, 0, 1, 2, 2)) == (0, 0, 1, 1, 0, 1)
    assert runs_of((0, 0, 1, 2, 2)) == [[0, 1], [2], [3, 4]]
    assert is_consecutive((0, 0, 1)) and not is_consecutive((0, 1, 0))


@pytest.mark.parametrize("assignment, positions, message", [
    ((0, 1, 0), 4, "has 3 entries but the stack has 4 positions"),
    ((0, 1, 5, 1), 4, "index 5 at position 2; indices are ints in [0, 4)"),
    ((0, -1), 2, "index -1 at position 1"),
    ((0, 2, 2), 3, "never uses unique block(s) [1]"),
    ((0, 1.0), 2, "index 1.0 at position 1"),
])
def test_bad_assignments_say_what_is_wrong(assignment, positions, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        check_assignment(assignment, positions, "the stack")


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="share='ring' is not one of"):
        sharing_assignment("ring", 6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=12))
def test_loop_indices_count_earlier_uses(assignment):
    loops = loop_indices(assignment)
    for p, index in enumerate(assignment):
        assert loops[p] == assignment[:p].count(index)
    assert [p for run in runs_of(assignment) for p in run] == list(range(len(assignment)))


@pytest.mark.parametrize("share", ["consecutive", "cycle", (0, 1, 0, 1, 2, 2), (2, 0, 1, 2, 0, 1)])
def test_vit_schedules_run_the_assigned_blocks_and_share_their_parameters(share):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    make_recursive(model, loops=2, share=share)
    assignment = sharing_assignment(share, 6, loops=2)
    units = shared_units(model)["blocks"]
    assert len(units) == max(assignment) + 1
    # parameter identity: one tensor per unique block, stored once
    pointers = [{p.data_ptr() for p in unit.parameters()} for unit in units]
    assert all(not (a & b) for i, a in enumerate(pointers) for b in pointers[i + 1:])
    assert sum(p.numel() for p in model.blocks.parameters()) == sum(
        p.numel() for unit in units for p in unit.parameters())
    calls = executed_units(model, torch.randn(1, 3, 32, 32))["blocks"]
    first_use = {}
    for index in assignment:
        first_use.setdefault(index, len(first_use))
    # consecutive runs become one Recursive each; indices of units follow first use
    expected = [first_use[i] for i in assignment] if is_consecutive(assignment) else list(assignment)
    assert calls == expected
    if is_consecutive(assignment):  # a Recursive's block is entered once per application
        assert all(isinstance(layer, Recursive) for layer in model.blocks)
    else:
        assert isinstance(model.blocks[0], SharedSequence) and len(model.blocks) == 1


def test_plan_follows_the_assignment_and_loads_the_first_use():
    torch.manual_seed(0)
    base = tiny_vit()
    state = base.state_dict()
    model = tiny_vit()
    plan = make_recursive(model, loops=2, share=(0, 1, 0, 1, 2, 2))
    assert plan.applications["blocks.2"] == ("blocks.0.blocks.0", 1)
    assert plan.applications["blocks.4"] == ("blocks.0.blocks.2", 0)
    assert plan.block_paths["blocks.3"] is None and plan.block_paths["blocks.1"] == "blocks.0.blocks.1"
    report = load_base_weights(model, state, plan)
    assert torch.equal(model.blocks[0].blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.blocks[0].blocks[2].mlp.fc2.bias, state["blocks.4.mlp.fc2.bias"])
    assert any(k.startswith("blocks.2.") for k in report.unused)
    recovered = recursion_plan_of(model, state)
    assert recovered.applications == plan.applications and recovered.block_paths == plan.block_paths


def test_pit_takes_one_assignment_per_stack_and_swin_shares_block_pairs():
    torch.manual_seed(0)
    pit = timm.create_model("pit_ti_224", img_size=128).eval()  # stacks of 2, 6, 4 blocks
    share = ((0, 0), (0, 1, 2, 0, 1, 2), (0, 1, 0, 1))
    make_recursive(pit, share=share)
    calls = executed_units(pit, torch.randn(1, 3, 128, 128))
    assert calls == {"transformers.0.blocks": [0, 0], "transformers.1.blocks": [0, 1, 2, 0, 1, 2],
                     "transformers.2.blocks": [0, 1, 0, 1]}
    swin = tiny_swin().eval()  # stage 3 holds 4 blocks = 2 (W-MSA, SW-MSA) pairs
    plan = make_recursive(swin, loops=2, share="cycle")
    unit = swin.layers[2].blocks[0].block
    assert isinstance(unit, nn.Sequential) and [b.shift_size for b in unit] == [(0, 0), (3, 3)]
    assert plan.applications["layers.2.blocks.2"] == ("layers.2.blocks.0.block.0", 1)
    assert swin(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_assignment_errors_through_make_recursive_name_the_stack():
    with pytest.raises(ValueError, match=r"has 3 entries but blocks \(6 blocks\) has 6 positions"):
        make_recursive(tiny_vit(), share=(0, 1, 2))
    with pytest.raises(ValueError, match=r"index 6 at position 5"):
        make_recursive(tiny_vit(), share=(0, 1, 2, 0, 1, 6))
    with pytest.raises(ValueError, match="give one assignment per stack"):
        make_recursive(timm.create_model("pit_ti_224", img_size=128), share=(0, 1, 0, 1, 2, 2))
    model = tiny_vit()
    before = [type(b) for b in model.blocks]
    with pytest.raises(ValueError):
        make_recursive(model, share=(0, 2, 2, 2, 2, 2))
    assert [type(b) for b in model.blocks] == before  # nothing was rewritten


def test_shared_sequence_mixes_and_checkpointing():
    torch.manual_seed(0)
    blocks = [TransformerBlock(dim=32, num_heads=2, groups=(4, 2)) for _ in range(2)]
    stack = SharedSequence(blocks, (0, 1, 0, 1), mix=lambda: NonLinearMix(32))
    assert len(stack.mix) == 4 and stack.loops == (2, 2)
    x = torch.randn(2, 16, 32, requires_grad=True)
    stack.eval()
    manual = x
    for position, (index, loop) in enumerate(zip((0, 1, 0, 1), (0, 0, 1, 1))):
        manual = stack.mix[position](blocks[index](manual, loop=loop))
    assert torch.equal(stack(x), manual)
    assert_checkpointing_changes_nothing(stack, x)
    with pytest.raises(ValueError, match="uses 2 unique blocks but 3 were given"):
        SharedSequence(blocks + [nn.Identity()], (0, 1))


@pytest.mark.parametrize("share", ["cycle", ((0, 1, 0, 1), (0, 1, 2, 3, 4, 0, 1, 2, 3, 4), (0, 1, 2, 0, 1, 2))])
def test_sret_stages_follow_the_schedule(share):
    torch.manual_seed(0)
    model = timm.create_model("sret_t", img_size=64, share=share).eval()
    reference = timm.create_model("sret_t", img_size=64).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    stage = model.stages[1].blocks[0]
    assert isinstance(stage, SharedSequence) and stage.assignment == (0, 1, 2, 3, 4, 0, 1, 2, 3, 4)
    order = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: order.append(i)) for i, b in enumerate(stage.blocks)]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    assert order == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    for handle in handles:
        handle.remove()
    with pytest.raises(ValueError, match="uses 2 unique blocks; the stage has 3"):
        timm.create_model("sret_t", img_size=64, share=((0, 1, 0, 1), (0, 1, 2, 3, 4) * 2, (0, 1) * 3))


def test_relaxed_stacks_keep_their_plan():
    base = tiny_vit()
    model = tiny_vit()
    plan = make_recursive(model, share="cycle", relax={"rank": 2})
    assert all(isinstance(b, RelaxedBlock) for b in model.blocks[0].blocks)
    assert plan.block_paths["blocks.1"] == "blocks.0.blocks.1.shared"
    report = load_base_weights(model, base.state_dict(), plan)
    assert torch.equal(model.blocks[0].blocks[1].shared.attn.qkv.weight, base.state_dict()["blocks.1.attn.qkv.weight"])
    assert all("lora" in key for key in report.new)
    assert recursion_plan_of(model, base.state_dict()).applications == plan.applications


@pytest.mark.parametrize("share", [False, True, "cycle"])
def test_a_shared_mix_layer_is_one_per_recursive_layer(share):
    model = tiny_vit()
    make_recursive(model, loops=2, share=share, mix="shared")
    mixes = [layer.mix for layer in model.blocks]
    assert all(isinstance(m, NonLinearMix) for m in mixes)
    assert len({id(m) for m in mixes}) == len(mixes) == {False: 6, True: 3, "cycle": 1}[share]
