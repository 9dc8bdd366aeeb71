"""The GPU path: every backend against float64, half-precision training, compile, sync-free steps.

All of these skip cleanly on a machine without CUDA; `benchmarks/gpu_check.sh` runs them
on a GPU machine.
"""

import copy

import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import vitblocks  # noqa: F401  (registers the models)
from conftest import requires_cuda
from reference import dense_group_mask, masked_attention
from train_helpers import TINY_SRET
from vitblocks.attention import (
    AttentionBackendError,
    TokenGroups,
    available_backends,
    group_attention,
    select_backend,
)
from vitblocks.attention.backends import xformers_kernel_problem
from vitblocks.layers import SlicedGroupAttention, compile_regions

pytestmark = [requires_cuda, pytest.mark.cuda]

HALF = (torch.float16, torch.bfloat16)
# (patch tokens, groups, prefix tokens): equal groups, near-equal groups, prefix tokens, one group
CASES = [(196, 4, 0), (197, 8, 0), (196, 8, 1), (199, 3, 2), (49, 1, 1), (3136, 8, 0)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def reference_and_grads(q, k, v, grad, n, g, prefix):
    """Dense masked attention in float64 on the GPU, and its gradients."""
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*inputs, dense_group_mask(n, g, prefix).to(q.device))
    out.backward(grad.double())
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("n, g, prefix", CASES[:-1])
def test_every_backend_matches_float64_forward_and_backward(dtype, n, g, prefix):
    gen = torch.Generator("cuda").manual_seed(n * 31 + g)
    q, k, v = (torch.randn(2, prefix + n, 3, 32, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    grad = torch.randn(q.shape, device="cuda", dtype=dtype, generator=gen)
    ref, ref_grads = reference_and_grads(q, k, v, grad, n, g, prefix)
    bound = 1e-3 if dtype == torch.float32 else 1e-2
    backends = available_backends("cuda", dtype)
    assert "sdpa" in backends and "math" in backends
    for backend in backends:
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = group_attention(*inputs, g, num_prefix_tokens=prefix, backend=backend)
        out.backward(grad)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert relative_error(out, ref) <= bound, (backend, "forward", relative_error(out, ref))
        for name, tensor, expected in zip("qkv", inputs, ref_grads):
            error = relative_error(tensor.grad, expected)
            assert error <= bound, (backend, f"d{name}", error)


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("n, g, prefix", CASES)
def test_auto_picks_a_backend_that_runs_the_input(dtype, n, g, prefix):
    q = torch.randn(2, prefix + n, 2, 32, device="cuda", dtype=dtype, requires_grad=True)
    chosen = select_backend(q, kv_len=prefix + TokenGroups(n, g, prefix).runs[0].size)
    assert chosen.name in available_backends("cuda", dtype)
    group_attention(q, q, q, g, num_prefix_tokens=prefix).float().sum().backward()
    assert torch.isfinite(q.grad).all()


def test_auto_runs_sdpa_and_xformers_runs_by_name_exactly_when_its_kernels_run_here():
    pytest.importorskip("xformers.ops")
    q = torch.randn(2, 197, 3, 32, device="cuda", dtype=torch.bfloat16)
    assert select_backend(q).name == "sdpa"  # measured faster at every sliced shape
    compiled = torch.compile(lambda t: group_attention(t, t, t, 4), fullgraph=True)
    torch.testing.assert_close(compiled(q), group_attention(q, q, q, 4, backend="sdpa"))
    problem = xformers_kernel_problem("cuda:0", torch.bfloat16, 32)
    if problem is None:  # a wheel built for this torch and GPU
        assert "xformers" in available_backends("cuda", torch.bfloat16)
        torch.testing.assert_close(group_attention(q, q, q, 4, backend="xformers"),
                                   group_attention(q, q, q, 4, backend="sdpa"), atol=2e-2, rtol=2e-2)
    else:  # e.g. a wheel built for another torch: a forced choice must say why
        assert "xformers" not in available_backends("cuda", torch.bfloat16)
        with pytest.raises(AttentionBackendError, match="kernels cannot run"):
            group_attention(q, q, q, 4, backend="xformers")


def tiny_sret(**kwargs):
    return timm.create_model("sret_t", img_size=64, num_classes=10, **{**TINY_SRET, **kwargs}).cuda()


def train_step(model, optimizer, images, labels, dtype, scaler=None):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach()


def test_bf16_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_sret(drop_path_rate=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, labels = torch.randn(16, 3, 64, 64, device="cuda"), torch.arange(16, device="cuda") % 10
    losses = [train_step(model, optimizer, images, labels, torch.bfloat16).item() for _ in range(30)]
    assert all(map(lambda x: x == x, losses)) and losses[-1] < 0.5 * losses[0], losses


def test_fp16_training_with_a_grad_scaler():
    torch.manual_seed(0)
    model = tiny_sret(drop_path_rate=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cuda")
    images, labels = torch.randn(16, 3, 64, 64, device="cuda"), torch.arange(16, device="cuda") % 10
    before = copy.deepcopy(model.state_dict())
    losses = [train_step(model, optimizer, images, labels, torch.float16, scaler).item() for _ in range(30)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eager_and_compiled_training_steps_agree():
    torch.manual_seed(0)
    eager = tiny_sret(drop_path_rate=0.0, permutation="none")
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    images, labels = torch.randn(8, 3, 64, 64, device="cuda"), torch.arange(8, device="cuda") % 10
    results = []
    for model, module in ((eager, eager), (compiled, compiled_model)):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        losses = [train_step(model, optimizer, images, labels, torch.bfloat16) for _ in range(3)]
        results.append((torch.stack(losses).float(), module.head.weight.detach().float()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=2e-2)
    assert relative_error(results[1][1], results[0][1].double()) < 2e-2


def test_regional_compilation_matches_eager_on_the_gpu():
    torch.manual_seed(0)
    eager = tiny_sret(drop_path_rate=0.0, permutation="fixed", loops=3)
    regional = compile_regions(copy.deepcopy(eager))
    images, labels = torch.randn(8, 3, 64, 64, device="cuda"), torch.arange(8, device="cuda") % 10
    losses = []
    for model in (eager, regional):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        losses.append(loss.detach().float())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    assert relative_error(regional.head.weight.grad, eager.head.weight.grad.double()) < 5e-2
    eager.eval(), regional.eval()
    with torch.no_grad():
        assert relative_error(regional(images), eager(images).double()) < 1e-3


def test_random_permutations_are_drawn_on_the_gpu_without_synchronising():
    attn = SlicedGroupAttention(64, 2, groups=(4, 2)).cuda().train()
    x = torch.randn(4, 196, 64, device="cuda", requires_grad=True)
    attn(x, loop=1)  # warm up: first calls may initialise the generator and kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attn(x, loop=1)
        out.sum().backward()
        perm = attn.permutation_at(196, loop=1, device=x.device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert perm.device.type == "cuda" and perm.sort().values.equal(torch.arange(196, device="cuda"))
    torch.manual_seed(5)
    first = attn.permutation_at(196, loop=1, device=x.device)
    torch.manual_seed(5)
    assert first.equal(attn.permutation_at(196, loop=1, device=x.device))  # seeded by torch.manual_seed


def test_cpu_generator_policy_reproduces_the_cpu_stream_on_the_gpu():
    attn = SlicedGroupAttention(64, 2, groups=(4, 2), permutation="random_cpu").cuda().train()
    torch.manual_seed(7)
    on_gpu = attn.permutation_at(196, loop=1, device=torch.device("cuda"))
    torch.manual_seed(7)
    assert on_gpu.cpu().equal(torch.randperm(196))


def test_sret_forward_matches_on_cpu_and_gpu():
    model = timm.create_model("sret_t", img_size=64, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x).double()
    assert relative_error(model.cuda()(x.cuda()).cpu(), expected) <= 1e-3  # TF32 convolutions allowed


def test_sdpa_on_heads_of_42_channels_is_padded_and_matches_float64():
    n, g, prefix = 196, 4, 1
    gen = torch.Generator("cuda").manual_seed(42)
    q, k, v = (torch.randn(2, prefix + n, 3, 42, device="cuda", dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    grad = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref, ref_grads = reference_and_grads(q, k, v, grad, n, g, prefix)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    # the memory-efficient kernel refuses 42-channel heads: this runs only because sdpa pads them
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        out = group_attention(*inputs, g, num_prefix_tokens=prefix, backend="sdpa")
        out.backward(grad)
    assert out.shape == q.shape and relative_error(out, ref) <= 1e-2
    for tensor, expected in zip(inputs, ref_grads):
        assert relative_error(tensor.grad, expected) <= 1e-2


def test_pooling_repeats_channels_for_cuda_inputs_by_default(monkeypatch):
    from vitblocks.layers import ConvPool, pool

    calls = []
    real = pool.depthwise_on_repeated_channels
    monkeypatch.setattr(pool, "depthwise_on_repeated_channels", lambda *a: calls.append(1) or real(*a))
    default, grouped = ConvPool(64, 128).cuda(), ConvPool(64, 128, repeat_input=False).cuda()
    grouped.load_state_dict(default.state_dict())
    x = torch.randn(2, 64, 28, 28, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(default(x), grouped(x), atol=1e-4, rtol=1e-4)
    assert calls == [1]
