"""Regional compilation: one compiled application per shared block, whatever the loop count."""

import copy

import pytest
import timm
import torch
from torch import nn

import vitblocks  # noqa: F401  (registers the models)
from train_helpers import TINY_SRET
from vitblocks.layers import LoopPlan, Recursive, TransformerBlock, compile_regions


class GraphCounter:
    """A torch.compile backend that runs graphs as traced and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def tiny(loops=2, **kwargs):
    options = {**TINY_SRET, "drop_path_rate": 0.0, **kwargs}
    return timm.create_model("sret_t", img_size=32, num_classes=5, loops=loops, mix="shared", **options)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow  # compiles
def test_regions_compute_what_the_eager_model_computes():
    torch.manual_seed(0)
    eager = tiny(loops=3, permutation="fixed")
    regional = compile_regions(copy.deepcopy(eager), backend=GraphCounter())
    x = torch.randn(2, 3, 32, 32)
    for model in (eager, regional):
        model(x).square().sum().backward()
    torch.testing.assert_close(regional(x), eager(x))
    for (name, a), b in zip(eager.named_parameters(), regional.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    eager.eval(), regional.eval()
    torch.testing.assert_close(regional(x), eager(x))


def test_random_permutations_are_drawn_as_in_eager_mode():
    eager = tiny(loops=3)
    regional = compile_regions(copy.deepcopy(eager), backend=GraphCounter())
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(4)
    expected = eager(x)
    torch.manual_seed(4)
    torch.testing.assert_close(regional(x), expected)


@pytest.mark.parametrize("mode", ["loop", "sqrt"])
def test_regions_work_under_activation_checkpointing(mode):
    torch.manual_seed(0)
    eager = tiny(loops=5, permutation="fixed", grad_checkpointing=mode)
    regional = compile_regions(copy.deepcopy(eager), backend=GraphCounter())
    x = torch.randn(2, 3, 32, 32)
    for model in (eager, regional):
        model(x).sum().backward()
    for a, b in zip(eager.parameters(), regional.parameters()):
        torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.slow  # compiles
def test_compiled_graphs_do_not_grow_with_the_loop_count():
    counts = {}
    for loops in (2, 8):
        torch._dynamo.reset()
        counter = GraphCounter()
        model = compile_regions(tiny(loops=loops), backend=counter)
        x = torch.randn(2, 3, 32, 32)
        model(x).sum().backward()
        model.eval()(x)
        counts[loops] = counter.graphs
    # per stage: loop 0 (no permutation) and later loops, in training and in eval
    assert counts[2] == counts[8] <= 3 * 2 * 2, counts


def test_state_dict_and_copies_are_those_of_the_plain_model():
    plain = tiny()
    regional = compile_regions(copy.deepcopy(plain), backend=GraphCounter())
    assert list(regional.state_dict()) == list(plain.state_dict())
    again = copy.deepcopy(regional)
    assert all(m.compiled for m in again.modules() if isinstance(m, Recursive))


def test_plain_and_loop_aware_blocks_can_be_compiled():
    class LoopScale(nn.Module):
        loop_aware = True

        def forward(self, x, loop=0):
            return x * (loop + 1)

    counter = GraphCounter()
    for block, expected in ((nn.Linear(4, 4), None), (LoopScale(), 6.0)):
        stage = Recursive(block, loops=3)
        x = torch.ones(2, 4)
        reference = stage(x)
        stage.compile_block(backend=counter)
        torch.testing.assert_close(stage(x), reference)
        if expected is not None:
            assert reference.eq(expected).all()
    assert counter.graphs >= 2


def test_a_block_plans_its_loops_ahead():
    block = TransformerBlock(16, 2, groups=(4, 2))
    x = torch.randn(2, 16, 16)
    assert block.loop_plan(x, 0) == LoopPlan(4)
    plan = block.eval().loop_plan(x, 1)
    assert plan.num_groups == 2 and plan.perm[plan.inverse].equal(torch.arange(16))
    torch.testing.assert_close(block(x, plan=plan), block(x, loop=1))


def test_a_model_without_recursion_is_refused_with_what_to_do():
    with pytest.raises(ValueError, match="no Recursive block.*torch.compile"):
        compile_regions(nn.Linear(2, 2))
