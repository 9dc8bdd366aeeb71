"""Options defined once: group schedules, str enums, device/dtype, stem geometry."""

import pytest
import timm
import torch
from hypothesis import given
from hypothesis import strategies as st

import vitblocks  # noqa: F401  (registers the models)
from vitblocks import ConvPool, ConvStem, NonLinearMix, PositionMap, Recursive, SlicedGroupAttention, TransformerBlock
from vitblocks.layers import CheckpointMode, GroupSchedule, MixMode, PermutationPolicy
from vitblocks.models.sret import stage_grids

counts = st.lists(st.integers(1, 64), min_size=1, max_size=5)


@given(counts, st.integers(0, 10), st.integers(1, 80))
def test_group_schedule_repeats_its_last_entry_and_checks_fit_in_one_place(values, loop, tokens):
    schedule = GroupSchedule.parse(values)
    assert schedule == GroupSchedule.parse(tuple(values)) == GroupSchedule.parse(schedule)
    assert schedule.at(loop) == values[min(loop, len(values) - 1)]
    if tokens >= schedule.at(loop):
        schedule.check_fits(tokens, loop=loop)
    else:
        with pytest.raises(ValueError,
                           match=f"needs at least {schedule.at(loop)} tokens on loop {loop} but gets {tokens}"):
            schedule.check_fits(tokens, loop=loop)


@pytest.mark.parametrize("bad", [0, -1, (), (2, 0), (2.0,), True, "4"])
def test_bad_group_schedules_name_the_value(bad):
    with pytest.raises(ValueError, match="groups must be a positive int"):
        GroupSchedule.parse(bad)


def test_group_schedules_per_stage_have_one_rule_for_sret_and_plugged_models():
    assert GroupSchedule.per_stage(4, 3) == (GroupSchedule((4,)),) * 3
    assert GroupSchedule.per_stage((4, 2), 2) == (GroupSchedule((4, 2)),) * 2
    assert GroupSchedule.per_stage(((8, 2), 1), 2) == (GroupSchedule((8, 2)), GroupSchedule((1,)))
    with pytest.raises(ValueError, match="gives 2 schedules for 3 stages"):
        GroupSchedule.per_stage(((8, 2), (1,)), 3)
    model = timm.create_model("sret_t", img_size=64, groups=(4, 2))  # one schedule, every stage
    assert [stage.groups for stage in model.stages] == [(4, 2)] * 3


def test_modes_are_str_enums_that_layers_accept_either_way():
    assert MixMode.SHARED == "shared" and PermutationPolicy("fixed") is PermutationPolicy.FIXED
    a = Recursive(TransformerBlock(16, 2), loops=2, mix=None, grad_checkpointing=CheckpointMode.SQRT)
    b = Recursive(TransformerBlock(16, 2), loops=2, mix=None, grad_checkpointing="sqrt")
    assert a.grad_checkpointing == b.grad_checkpointing == "sqrt"
    model = timm.create_model("sret_t", img_size=64, mix=MixMode.SHARED, eval_permutation="official")
    assert model.stages[0].blocks[0].shared_mix
    assert model.stages[0].blocks[0].block.attn.eval_permutation is PermutationPolicy.RANDOM_CPU
    with pytest.raises(ValueError, match=r"mix='sometimes' is not one of \('per_loop', 'shared', 'none'\)"):
        timm.create_model("sret_t", img_size=64, mix="sometimes")
    with pytest.raises(ValueError, match=r"grad_checkpointing='always' is not one of"):
        Recursive(TransformerBlock(16, 2), grad_checkpointing="always")


@pytest.mark.parametrize("build", [
    lambda dd: TransformerBlock(16, 2, residual_scalars=True, drop_path=0.1, groups=(2, 1), **dd),
    lambda dd: SlicedGroupAttention(16, 2, **dd),
    lambda dd: NonLinearMix(16, **dd),
    lambda dd: ConvStem(3, 16, **dd),
    lambda dd: ConvPool(16, 32, **dd),
    lambda dd: PositionMap(16, 4, **dd),
    lambda dd: timm.create_model("sret_t", img_size=64, **dd),
])
def test_layers_and_models_take_device_and_dtype_like_timm(build):
    module = build(dict(device="meta", dtype=torch.float64))
    tensors = list(module.parameters())
    assert tensors and all(t.device.type == "meta" and t.dtype == torch.float64 for t in tensors)


@given(st.integers(64, 130), st.integers(64, 130))
def test_position_map_is_stored_at_the_stem_grid_so_it_is_never_resized_at_its_own_size(h, w):
    model = timm.create_model("sret_t_unsliced", img_size=(h, w), num_classes=2)
    assert tuple(model.pos_embed.weight.shape[-2:]) == stage_grids((h, w), 3)[0] == tuple(
        model.patch_embed(torch.zeros(1, 3, h, w)).shape[-2:])


def test_position_map_loads_a_map_of_another_grid_resized():
    small, large = PositionMap(8, (12, 12)), PositionMap(8, (13, 13))
    large.load_state_dict(small.state_dict())
    torch.testing.assert_close(large.weight, torch.nn.functional.interpolate(
        small.weight, size=(13, 13), mode="bicubic", align_corners=False))
