"""The lean training step: fused residual sums, stochastic depth folded into their gates,
one-gather permutation backward, and a trainer step that never waits for the device."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from train_helpers import TINY_SRET, tiny_config
from vitblocks.layers import NonLinearMix, Recursive, TransformerBlock
from vitblocks.layers.drop import keep_mask
from vitblocks.layers.modes import PermutationPolicy
from vitblocks.layers.permutation import permute_tokens, permute_tokens_with_inverse, random_permutation
from vitblocks.layers.residual import scaled_residual
from vitblocks.train import ConfigError, ModelConfig, OnStepEnd, Trainer
from vitblocks.train.run.builders import build_optimizer_and_schedule

ROOT = Path(__file__).resolve().parents[1]


def _leaves(*shapes, dtype=torch.float64):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def _residual_inputs(shape, per_sample):
    """x, skip, y, scale of a residual sum (float64 leaves) and a drop mask of the batch, or None."""
    torch.manual_seed(0)
    x, y = _leaves(shape, shape)
    skip, scale = _leaves((1,), (1,))
    mask = torch.tensor([2.0, 0.0, 2.0], dtype=torch.float64).view(3, 1, 1) if per_sample else None
    return x, skip, y, scale, mask


@pytest.mark.parametrize("per_sample", [False, True])
def test_scaled_residual_matches_autograd_of_the_plain_formula(per_sample):
    x, skip, y, scale, mask = _residual_inputs((3, 5, 4), per_sample)
    out = scaled_residual(x, skip, y, scale, mask)
    reference = x * skip + y * (scale if mask is None else scale * mask)
    grad = torch.randn_like(out)
    fused = torch.autograd.grad(out, (x, skip, y, scale), grad)
    plain = torch.autograd.grad(reference, (x, skip, y, scale), grad)
    torch.testing.assert_close(out, reference)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b)


def test_scaled_residual_keeps_a_bfloat16_sum_in_bfloat16():
    x, y = torch.randn(2, 3, 4, dtype=torch.bfloat16), torch.randn(2, 3, 4, dtype=torch.bfloat16)
    skip, scale = torch.ones(1, requires_grad=True), torch.ones(1, requires_grad=True)
    out = scaled_residual(x.requires_grad_(), skip, y.requires_grad_(), scale, torch.ones(2, 1, 1))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert skip.grad.dtype == scale.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


def test_permutation_backward_is_the_gradient_of_index_select():
    torch.manual_seed(1)
    perm = random_permutation(7)
    inverse = torch.argsort(perm)
    x = torch.randn(2, 9, 3, requires_grad=True)
    grad = torch.randn(2, 9, 3)
    fast = torch.autograd.grad(permute_tokens_with_inverse(x, perm, inverse, 2), x, grad)[0]
    plain = torch.autograd.grad(permute_tokens(x, perm, 2), x, grad)[0]
    assert torch.equal(fast, plain)


def test_a_block_with_stochastic_depth_computes_the_paper_formula_with_its_drawn_masks():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, drop_path=0.3, residual_scalars=True, groups=1).train()
    with torch.no_grad():
        for p in (block.skip_scale1, block.branch_scale1, block.skip_scale2, block.branch_scale2):
            p.uniform_(0.5, 1.5)
    x = torch.randn(6, 10, 16)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    masks = keep_mask(x, block.drop_path1.keep_prob, draws=2)  # loop 0 draws nothing else
    u = x * block.skip_scale1 + block.attn(block.norm1(x)) * block.branch_scale1 * masks[0]
    expected = u * block.skip_scale2 + block.mlp(block.norm2(u)) * block.branch_scale2 * masks[1]
    torch.testing.assert_close(out, expected)
    values = masks.flatten()
    assert torch.all((values == 0) | torch.isclose(values, torch.tensor(1 / 0.7))) and 0 < values.count_nonzero() < 12


def _tiny_stage():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, mlp_ratio=2.0, residual_scalars=True, groups=(1, 2), permutation="fixed")
    return Recursive(block, loops=2, mix=lambda: NonLinearMix(16)).train()


@pytest.mark.slow
def test_a_compiled_training_step_equals_the_eager_one_at_a_fixed_permutation():
    eager = _tiny_stage()
    compiled = _tiny_stage()
    x = torch.randn(2, 12, 16)

    def step(model, run):
        out = run(x)
        loss = out.square().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss_eager, grads_eager = step(eager, eager)
    loss_compiled, grads_compiled = step(compiled, torch.compile(compiled))
    torch.testing.assert_close(loss_compiled, loss_eager)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_and_foreach_adamw_take_the_same_steps(tmp_path):
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer_and_schedule(models[0], config, 10)[0]
    foreach = build_optimizer_and_schedule(
        models[1], tiny_config(tmp_path, optim=type(config.optim)(lr=1e-3, fused=False)), 10)[0]
    assert fused.defaults["fused"] and not foreach.defaults.get("fused")
    for _ in range(5):
        batch = torch.randn(4, 6)
        for model, optimizer in zip(models, (fused, foreach)):
            optimizer.zero_grad()
            model(batch).square().mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _ScalarReads(TorchDispatchMode):
    """Counts `aten._local_scalar_dense`: what `.item()`, `float(t)` and `if t:` dispatch."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_training_steps_read_nothing_from_the_device_except_on_logging_steps(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, epochs=1, log_every=3, ema_decay=0.9), callbacks=None)
    reads = _ScalarReads()
    per_step, read_at = [], []
    trainer.callbacks.append(OnStepEnd(lambda t: per_step.append(reads.count)))
    read_losses = trainer.read_losses
    trainer.read_losses = lambda: read_at.append((trainer.step, len(trainer._unread_losses))) or read_losses()
    with reads:
        trainer.fit(progress=False)
    counts = [b - a for a, b in zip(per_step, per_step[1:])]  # steps 2..6; step 1 also holds the run's start
    assert counts == [0, 0, 0, 0, 0], counts
    # the losses cross to the host in one transfer every log_every steps, and before each checkpoint
    assert [(step, n) for step, n in read_at if n] == [(3, 3), (6, 3)], read_at


def test_the_committed_op_count_table_meets_the_byte_target():
    record = json.loads((ROOT / "docs/benchmarks/cpu/op_count.json").read_text())
    models, base = record["models"], record["models"][record["baseline"]]
    sret = models["sret_t"]
    assert sret["ops"] == sum(sret["forward"].values()) + sum(sret["backward"].values())
    assert sret["bytes_per_image"] / base["bytes_per_image"] <= record["targets"]["bytes_per_image"]
    table = (ROOT / "docs/benchmarks/cpu/op_count.md").read_text()
    assert f"| sret_t | {sret['ops']:,} |" in table
    assert f"{sret['ops'] / base['ops']:.2f}x" in table


def test_graphs_mode_is_refused_with_its_reasons(tmp_path):
    from vitblocks.train.run.compile_modes import compile_mode, graphs_refusals

    with pytest.raises(ConfigError, match="model.compile='graphs' cannot run here: CUDA graphs need a CUDA device"):
        Trainer(tiny_config(tmp_path, model=ModelConfig("sret_t", kwargs=dict(TINY_SRET), compile="graphs")))
    model = torch.nn.Sequential(_tiny_stage())
    assert graphs_refusals(model, torch.device("cuda"), False) == []
    model[0].block.attn.permutation = PermutationPolicy.RANDOM_CPU
    reasons = graphs_refusals(model, torch.device("cuda"), "sqrt")
    assert len(reasons) == 2 and "permutation='random'" in reasons[0] and "#130123" in reasons[1]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [compile_mode(v, cpu) for v in (False, True, "regional", "auto")] == ["none", "model", "regional", "none"]
    assert compile_mode("auto", cuda) in ("none", "model", "regional", "graphs")


def test_pooling_on_repeated_channels_is_the_grouped_convolution():
    from vitblocks.layers import ConvPool

    grouped, repeated = ConvPool(8, 16, repeat_input=False), ConvPool(8, 16, repeat_input=True)
    repeated.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16, 5, 5)
    outs = [pool(x) for pool in (grouped, repeated)]
    torch.testing.assert_close(outs[1], outs[0])
    assert outs[1].is_contiguous(memory_format=torch.channels_last)
    grads = [torch.autograd.grad(out, [x, pool.conv.weight], grad) for out, pool in zip(outs, (grouped, repeated))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    traced = torch.fx.symbolic_trace(repeated)
    assert torch.equal(traced(x), outs[1])


@pytest.mark.parametrize("per_sample", [False, True])
def test_scaled_residual_is_correct_to_second_order(per_sample):
    x, skip, y, scale, mask = _residual_inputs((3, 4, 2), per_sample)

    def residual(x, skip, y, scale):
        out = scaled_residual(x, skip, y, scale, mask)
        assert type(out.grad_fn).__name__ == "_ScaledResidualBackward"  # the custom backward, not plain autograd
        return out

    assert torch.autograd.gradcheck(residual, (x, skip, y, scale))
    assert torch.autograd.gradgradcheck(residual, (x, skip, y, scale))


def test_permutation_backward_is_correct_to_second_order():
    torch.manual_seed(0)
    perm = random_permutation(5)
    inverse = torch.argsort(perm)
    (x,) = _leaves((2, 7, 3))

    def permuted(x):
        out = permute_tokens_with_inverse(x, perm, inverse, 2)
        assert type(out.grad_fn).__name__ == "CatBackward0"  # the prefix joined to the custom gather's output
        return out

    assert torch.autograd.gradcheck(permuted, (x,)) and torch.autograd.gradgradcheck(permuted, (x,))


def test_an_input_gradient_penalty_through_sret_with_stochastic_depth_matches_plain_autograd(monkeypatch):
    import timm

    import vitblocks.layers.permutation as permutation
    import vitblocks.layers.residual as residual
    from vitblocks import attention_backend

    model = timm.create_model("sret_t", img_size=32, num_classes=3, **{**TINY_SRET, "drop_path_rate": 0.3})
    model.train()
    images = torch.randn(4, 3, 32, 32)

    def penalty_gradients():
        torch.manual_seed(7)  # the same drop masks and permutations in both runs
        x = images.clone().requires_grad_()
        with attention_backend("math"):  # PyTorch's CPU flash attention has no double backward
            (grad_x,) = torch.autograd.grad(model(x).logsumexp(-1).sum(), x, create_graph=True)
        return torch.autograd.grad(grad_x.square().sum(), list(model.parameters()), allow_unused=True)

    custom = penalty_gradients()
    for module in (permutation, residual):
        monkeypatch.setattr(module, "custom_backward_applies", lambda *tensors: False)
    plain = penalty_gradients()
    for (name, _), a, b in zip(model.named_parameters(), custom, plain):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_pooling_repeats_channels_by_default_only_for_cuda_inputs(monkeypatch):
    from vitblocks.layers import ConvPool, pool

    calls = []
    real = pool.depthwise_on_repeated_channels
    monkeypatch.setattr(pool, "depthwise_on_repeated_channels", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 8, 9, 9)
    default = ConvPool(8, 16)
    assert default.repeat_input is None
    default(x)
    assert calls == []  # a CPU input: the grouped convolution
    ConvPool(8, 16, repeat_input=True)(x)
    assert calls == [1]
    assert torch.equal(torch.fx.symbolic_trace(default)(x), default(x))
