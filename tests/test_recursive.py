import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from vitblocks import NonLinearMix, Recursive, TransformerBlock


def count(module):
    return sum(p.numel() for p in module.parameters())


class LoopRecorder(nn.Module):
    loop_aware = True

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, x, loop=0):
        self.seen.append(loop)
        return x * self.weight + loop


@given(st.integers(1, 3), st.integers(1, 20), st.sampled_from([(1,), (4,), (4, 2), (2, 4, 1)]))
def test_one_loop_equals_the_block(heads, n, schedule):
    dim = heads * 4
    schedule = tuple(min(g, n) for g in schedule)
    block = TransformerBlock(dim, heads, groups=schedule).eval()
    x = torch.randn(2, n, dim)
    assert Recursive(block, loops=1, check_groups=False)(x).equal(block(x))


def test_loops_apply_the_block_repeatedly_with_their_index():
    block = TransformerBlock(16, 2, groups=(4, 2)).eval()
    x = torch.randn(2, 16, 16)
    expected = block(block(block(x, loop=0), loop=1), loop=2)
    torch.testing.assert_close(Recursive(block, loops=3)(x), expected)


def test_loop_index_is_passed_to_loop_aware_modules_only():
    recorder = LoopRecorder()
    assert Recursive(recorder, loops=3)(torch.zeros(1)).item() == 0 + 1 + 2
    assert recorder.seen == [0, 1, 2]
    linear = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    torch.testing.assert_close(Recursive(linear, loops=2)(x), linear(linear(x)))


def test_a_block_that_takes_a_loop_must_declare_it():
    class Undeclared(nn.Module):
        def forward(self, x, loop=0):
            return x + loop

    with pytest.raises(TypeError, match="Undeclared.forward takes a `loop` argument .* `loop_aware = True`"):
        Recursive(Undeclared(), loops=2)

    class Declined(Undeclared):
        loop_aware = False  # called as module(x)

    assert Recursive(Declined(), loops=3)(torch.zeros(1)).item() == 0


def test_parameters_are_those_of_the_block_plus_its_mix_layers():
    block = TransformerBlock(192, 3)
    mix_params = count(NonLinearMix(192))
    assert count(Recursive(block, loops=2)) == count(block)
    assert count(Recursive(block, loops=5)) == count(block)
    assert count(Recursive(block, loops=4, mix=lambda: NonLinearMix(192))) == count(block) + 4 * mix_params
    assert count(Recursive(block, loops=4, mix=NonLinearMix(192))) == count(block) + mix_params


def test_per_loop_mix_layers_are_distinct_and_applied_after_each_loop():
    block = nn.Linear(8, 8)
    stage = Recursive(block, loops=2, mix=lambda: NonLinearMix(8))
    assert stage.mix_at(0) is not stage.mix_at(1)
    x = torch.randn(3, 8)
    torch.testing.assert_close(stage(x), stage.mix_at(1)(block(stage.mix_at(0)(block(x)))))
    shared = Recursive(block, loops=3, mix=NonLinearMix(8))
    assert shared.mix_at(0) is shared.mix_at(2)


def test_gradients_reach_every_parameter():
    stage = Recursive(
        TransformerBlock(32, 2, groups=(4, 2), residual_scalars=True, num_prefix_tokens=1),
        loops=3,
        mix=lambda: NonLinearMix(32),
    ).train()
    stage(torch.randn(2, 1 + 23, 32)).square().mean().backward()
    for name, p in stage.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mix", [None, "per-loop", "shared"])
def test_checkpointing_gives_the_same_outputs_and_gradients(mix):
    mix = {None: None, "per-loop": lambda: NonLinearMix(16), "shared": NonLinearMix(16)}[mix]
    plain = Recursive(TransformerBlock(16, 2, groups=(4, 2), drop_path=0.2), loops=3, mix=mix).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 16, 16)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(0)  # same random permutations and drop paths in both
        model(x).sum().backward()
        results.append([p.grad for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def saved_activation_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return total


def test_checkpointing_keeps_only_loop_inputs():
    x = torch.randn(2, 64, 32)
    sizes = {}
    for checkpointing in (False, True):
        for loops in (2, 8):
            model = Recursive(TransformerBlock(32, 2, groups=(4, 2)), loops=loops, grad_checkpointing=checkpointing)
            sizes[checkpointing, loops] = saved_activation_bytes(model.train(), x)
    # without checkpointing every loop keeps its activations; with it, only the loop input
    assert sizes[False, 8] > 3 * sizes[False, 2]
    assert sizes[True, 8] < sizes[False, 8] / 5
    assert sizes[True, 8] <= 8 * x.numel() * x.element_size() * 1.5


@pytest.mark.parametrize("loops", [0, -1, 1.5, True, "2"])
def test_bad_loop_counts_raise_value_error_naming_loops(loops):
    with pytest.raises(ValueError, match="loops must be an int >= 1"):
        Recursive(nn.Identity(), loops=loops)


def test_bad_block_and_mix_raise_type_errors():
    with pytest.raises(TypeError, match="block"):
        Recursive(lambda x: x, loops=2)
    with pytest.raises(TypeError, match="mix"):
        Recursive(nn.Identity(), loops=2, mix=3)
    with pytest.raises(TypeError, match="mix factory"):
        Recursive(nn.Identity(), loops=2, mix=lambda: "not a module")


def make_stage():
    return Recursive(TransformerBlock(32, 2, groups=(4, 2)), loops=2, mix=lambda: NonLinearMix(32)).eval()


def test_save_and_load_with_torch_save(tmp_path):
    stage, other = make_stage(), make_stage()
    torch.save(stage.state_dict(), tmp_path / "stage.pt")
    other.load_state_dict(torch.load(tmp_path / "stage.pt", weights_only=True))
    x = torch.randn(1, 16, 32)
    assert other(x).equal(stage(x))


def test_save_and_load_with_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    stage, other = make_stage(), make_stage()
    safetensors_torch.save_model(stage, str(tmp_path / "stage.safetensors"))
    missing, unexpected = safetensors_torch.load_model(other, str(tmp_path / "stage.safetensors"))
    assert not missing and not unexpected
    x = torch.randn(1, 16, 32)
    assert other(x).equal(stage(x))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_torch_compile_fullgraph_matches_eager(mode):
    torch._dynamo.reset()
    stage = Recursive(
        TransformerBlock(32, 2, groups=(4, 2), num_prefix_tokens=1, residual_scalars=True),
        loops=2,
        mix=lambda: NonLinearMix(32),
    ).train(mode == "train")
    compiled = torch.compile(stage, fullgraph=True, backend="aot_eager" if mode == "train" else "inductor")
    x = torch.randn(2, 1 + 30, 32)
    torch.manual_seed(0)
    expected = stage(x)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)


def test_a_mask_for_a_block_that_takes_none_is_a_clear_error():
    stage = Recursive(TransformerBlock(dim=16, num_heads=2), loops=2)
    with pytest.raises(TypeError, match="TransformerBlock takes no attn_mask or is_causal"):
        stage(torch.randn(1, 4, 16), attn_mask=torch.ones(4, 4, dtype=torch.bool))
