import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import requires_cuda
from reference import dense_group_mask, masked_attention
from vitblocks.attention import (
    BACKENDS,
    CPU_BF16_MATH_MAX_KEYS,
    ENV_VAR,
    AttentionBackend,
    AttentionBackendError,
    TokenGroups,
    attention_backend,
    auto_order,
    auto_prefers_math,
    available_backends,
    backend_names,
    group_attention,
    register_backend,
    requested_backend,
    select_backend,
    unregister_backend,
)
from vitblocks.attention import backends as backends_module

CPU_BACKENDS = available_backends("cpu")


@st.composite
def grouped_inputs(draw):
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, 40))
    g = draw(st.integers(1, n))
    prefix = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, prefix + n, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(3))
    return q, k, v, n, g, prefix


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(inputs=grouped_inputs())
def test_grouped_attention_equals_dense_block_diagonal_mask(backend, inputs):
    q, k, v, n, g, prefix = inputs
    out = group_attention(q, k, v, g, num_prefix_tokens=prefix, backend=backend)
    expected = masked_attention(q, k, v, dense_group_mask(n, g, prefix))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(inputs=grouped_inputs())
def test_backends_match_math_in_float32(backend, inputs):
    q, k, v, _, g, prefix = (t.float() if torch.is_tensor(t) else t for t in inputs)
    out = group_attention(q, k, v, g, num_prefix_tokens=prefix, backend=backend)
    reference = group_attention(q, k, v, g, num_prefix_tokens=prefix, backend="math")
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_one_group_is_full_attention(prefix):
    q, k, v = torch.randn(3, 2, 17 + prefix, 4, 8).unbind(0)
    full = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    for backend in CPU_BACKENDS:
        out = group_attention(q, k, v, 1, num_prefix_tokens=prefix, backend=backend)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_custom_scale_and_token_groups_object():
    q, k, v = torch.randn(3, 2, 12, 2, 4, dtype=torch.float64).unbind(0)
    out = group_attention(q, k, v, TokenGroups(11, 3, num_prefix_tokens=1), scale=0.3)
    expected = masked_attention(q, k, v, dense_group_mask(11, 3, 1), scale=0.3)
    torch.testing.assert_close(out, expected)


def test_mismatched_token_groups_raise():
    q = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="describe 0 \\+ 10 tokens but the input has 12"):
        group_attention(q, q, q, TokenGroups(10, 2))


def test_mismatched_shapes_raise():
    q = torch.randn(1, 12, 2, 4)
    with pytest.raises(ValueError, match="share one shape"):
        group_attention(q, q[:, :6], q)


def test_too_many_groups_raise():
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="groups=6"):
        group_attention(q, q, q, 6)


def test_gradients_flow_through_every_backend():
    for backend in CPU_BACKENDS:
        q, k, v = (torch.randn(2, 13, 2, 4, requires_grad=True) for _ in range(3))
        group_attention(q, k, v, 3, num_prefix_tokens=1, backend=backend).square().sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.abs().sum() > 0


def test_auto_picks_sdpa_on_cpu_even_with_xformers_installed():
    assert select_backend(torch.randn(1, 4, 1, 2), backend="auto").name == "sdpa"


def test_auto_runs_short_bfloat16_cpu_groups_with_math_and_long_ones_with_sdpa(monkeypatch):
    monkeypatch.delenv("VITBLOCKS_ATTENTION", raising=False)
    short = torch.randn(1, 2 * CPU_BF16_MATH_MAX_KEYS, 1, 8, dtype=torch.bfloat16)
    assert auto_prefers_math(short, kv_len=CPU_BF16_MATH_MAX_KEYS)
    assert not auto_prefers_math(short, kv_len=CPU_BF16_MATH_MAX_KEYS + 1)
    assert not auto_prefers_math(short.float(), kv_len=8)
    assert select_backend(short).name == "sdpa"  # one group: every query sees all keys
    assert select_backend(short, kv_len=CPU_BF16_MATH_MAX_KEYS).name == "math"
    assert select_backend(short, backend="sdpa", kv_len=8).name == "sdpa"  # an explicit choice wins
    calls = []
    monkeypatch.setattr(BACKENDS["math"], "attend", lambda q, k, v, scale, p: calls.append(k.shape[1]) or q)
    group_attention(short, short, short, groups=2)
    assert calls == [CPU_BF16_MATH_MAX_KEYS]  # two equal groups, folded into one call


def test_auto_falls_back_to_math_for_float64_only_if_sdpa_refuses():
    chosen = select_backend(torch.randn(1, 4, 1, 2, dtype=torch.float64), backend="auto").name
    assert chosen in ("sdpa", "math")


def test_forcing_xformers_on_cpu_says_why():
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(AttentionBackendError, match="runs on CUDA only"):
        group_attention(q, q, q, 2, backend="xformers")


def test_missing_xformers_package_is_reported(monkeypatch):
    monkeypatch.setattr(backends_module, "XFORMERS_INSTALLED", False)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(AttentionBackendError, match="not installed"):
        group_attention(q, q, q, 2, backend="xformers")


def test_integer_inputs_are_refused_with_the_dtype():
    q = torch.ones(1, 4, 1, 2, dtype=torch.int64)
    with pytest.raises(AttentionBackendError, match="torch.int64 is not a floating-point type"):
        group_attention(q, q, q, backend="sdpa")


def test_unknown_backend_name_lists_the_choices():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*'sdpa'"):
        group_attention(q, q, q, backend="flash")


def test_environment_variable_selects_backend(monkeypatch):
    q = torch.randn(1, 4, 1, 2)
    monkeypatch.setenv(ENV_VAR, "math")
    assert select_backend(q).name == "math"
    monkeypatch.setenv(ENV_VAR, "xformers")
    with pytest.raises(AttentionBackendError):
        select_backend(q)
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=ENV_VAR):
        select_backend(q)


def test_context_manager_overrides_environment_and_nests(monkeypatch):
    q = torch.randn(1, 4, 1, 2)
    monkeypatch.setenv(ENV_VAR, "sdpa")
    with attention_backend("math"):
        assert select_backend(q).name == "math"
        with attention_backend("sdpa"):
            assert select_backend(q).name == "sdpa"
        assert select_backend(q).name == "math"
        assert select_backend(q, backend="sdpa").name == "sdpa"  # an explicit argument wins
    assert select_backend(q).name == "sdpa"


def test_context_manager_restores_after_an_exception():
    q = torch.randn(1, 4, 1, 2)
    with pytest.raises(RuntimeError), attention_backend("math"):
        raise RuntimeError
    assert select_backend(q).name == "sdpa"


def test_math_backend_is_visible_to_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    b, n, h, d, g = 2, 64, 4, 16, 4
    q = torch.randn(b, n, h, d)
    counter = FlopCounterMode(display=False)
    with counter:
        group_attention(q, q, q, g, backend="math")
    # two matmuls of (n/g x d) @ (d x n/g) per group, head and sample, 2 FLOPs per MAC
    assert counter.get_total_flops() == 2 * 2 * b * h * g * (n // g) ** 2 * d


@pytest.mark.parametrize("n, g, prefix", [(10, 4, 0), (10, 4, 2), (12, 4, 1), (7, 7, 0), (9, 2, 3)])
def test_xformers_block_diagonal_path_builds_the_right_bias(monkeypatch, n, g, prefix):
    """Runs the xformers grouping logic on CPU with the kernel swapped for a dense one."""
    pytest.importorskip("xformers.ops.fmha.attn_bias")

    class DenseOps:
        @staticmethod
        def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
            mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool)
            if attn_bias is not None:
                mask = attn_bias.materialize((q.shape[1], k.shape[1])) == 0
            return masked_attention(q, k, v, mask, scale).to(q.dtype)

    monkeypatch.setattr(backends_module, "_import_xformers_ops", lambda: DenseOps)
    q, k, v = torch.randn(3, 2, prefix + n, 2, 4, dtype=torch.float64).unbind(0)
    out = backends_module.XformersBackend().attend_groups(q, k, v, TokenGroups(n, g, prefix), 4**-0.5, 0.0)
    torch.testing.assert_close(out, masked_attention(q, k, v, dense_group_mask(n, g, prefix)))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, g, prefix", [(196, 8, 0), (196, 8, 1), (197, 8, 0), (49, 1, 1)])
def test_cuda_backends_match_math(dtype, n, g, prefix):
    q, k, v = torch.randn(3, 4, prefix + n, 4, 32, device="cuda", dtype=dtype).unbind(0)
    reference = group_attention(q.float(), k.float(), v.float(), g, num_prefix_tokens=prefix, backend="math")
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in available_backends("cuda", dtype):
        out = group_attention(q, k, v, g, num_prefix_tokens=prefix, backend=backend)
        torch.testing.assert_close(out.float(), reference, rtol=tolerance, atol=tolerance)


def test_math_backend_in_bfloat16_is_accurate_and_saves_no_float32_weights():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=gen) for _ in range(3))
    expected = group_attention(q.double(), k.double(), v.double(), groups=3, backend="math")
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):
        out = group_attention(*half, groups=3, backend="math")
    assert out.dtype == torch.bfloat16 and saved and torch.float32 not in saved
    torch.testing.assert_close(out.double(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("works", [True, False])
def test_xformers_kernel_probe_reports_kernels_that_cannot_run(monkeypatch, works):
    class Ops:
        @staticmethod
        def memory_efficient_attention(q, k, v):
            if not works:
                raise NotImplementedError("No operator found for `memory_efficient_attention_forward`\nmore")
            return q

    monkeypatch.setattr(backends_module, "_import_xformers_ops", lambda: Ops)
    monkeypatch.setattr(backends_module, "_XFORMERS_PROBES", {})
    problem = backends_module.xformers_kernel_problem("cpu", torch.float16, 16)
    if works:
        assert problem is None
    else:
        assert problem == "xformers' kernels cannot run it here (NotImplementedError: No operator found for " \
                          "`memory_efficient_attention_forward`)"
    # torch.compile runs the probe for real while tracing, without a graph break; its answer is
    # a constant of the compiled code (it holds for the process), so start from a clean cache
    torch._dynamo.reset()
    probe = torch.compile(lambda q: backends_module.xformers_kernel_problem("cpu", q.dtype, 8) is None,
                          backend="eager", fullgraph=True)
    assert probe(torch.randn(1, 2, 1, 8, dtype=torch.float16)) is works


class _RecordingBackend(AttentionBackend):
    """A registered test kernel: math attention that records its calls, with declared limits."""

    name, priority, max_head_dim, supports_dropout = "recording", 100, 8, False

    def __init__(self):
        self.calls = 0

    def attend(self, q, k, v, scale, dropout_p):
        self.calls += 1
        return BACKENDS["math"].attend(q, k, v, scale, dropout_p)


@pytest.fixture
def recording():
    backend = register_backend(_RecordingBackend())
    yield backend
    unregister_backend(backend.name)


def test_a_registered_backend_is_chosen_by_priority_and_by_name(recording):
    q = torch.randn(1, 8, 2, 4)
    assert backend_names()[:2] == ("auto", "recording")
    assert [b.name for b in auto_order(q)][0] == "recording"
    torch.testing.assert_close(group_attention(q, q, q, 2), group_attention(q, q, q, 2, backend="math"))
    assert recording.calls == 1  # two equal groups: one run, one kernel call
    with attention_backend("recording"):
        group_attention(q, q, q, 1)
    assert recording.calls == 2
    with pytest.raises(ValueError, match="already registered"):
        register_backend(_RecordingBackend())


def test_declared_capabilities_give_the_reasons_and_auto_skips_them(recording):
    wide = torch.randn(1, 8, 2, 16)
    assert recording.unsupported_reasons(wide, 0.1) == [
        "head size 16 is above recording's limit of 8",
        "recording does not apply attention dropout (got dropout_p=0.1)"]
    assert select_backend(wide).name != "recording"
    with pytest.raises(AttentionBackendError, match="head size 16 is above"):
        group_attention(wide, wide, wide, backend="recording")
    assert recording.calls == 0


def test_the_backend_context_is_per_thread():
    seen = {}
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        with attention_backend("math"):
            entered.set()
            release.wait(5)
            seen["inside"] = requested_backend()

    thread = threading.Thread(target=other_thread)
    thread.start()
    entered.wait(5)
    seen["main"] = requested_backend()  # the other thread's block does not leak here
    release.set()
    thread.join()
    assert seen == {"main": "auto", "inside": "math"}


def test_auto_follows_timms_fused_attention_switch():
    from timm.layers import set_fused_attn, use_fused_attn

    q = torch.randn(1, 16, 2, 8)
    before = use_fused_attn()
    try:
        set_fused_attn(False)
        assert auto_order(q)[0].name == "math" and select_backend(q).name == "math"
        set_fused_attn(True)
        assert select_backend(q).name == "sdpa"
    finally:
        set_fused_attn(before)


def test_auto_tries_sdpa_before_xformers_as_measured_on_the_gpu():
    assert [b.name for b in auto_order(torch.randn(1, 16, 2, 8))] == ["sdpa", "xformers", "math"]


def test_the_backend_context_is_compiled_into_a_full_graph_when_traced(recording):
    q = torch.randn(1, 12, 2, 4)
    compiled = torch.compile(lambda t: group_attention(t, t, t, 3), fullgraph=True, backend="eager")
    with attention_backend("math"):
        torch.testing.assert_close(compiled(q), group_attention(q, q, q, 3, backend="math"))
    assert recording.calls == 0  # traced under "math", although auto would take the recording backend
    compiled(q)  # outside the block the graph keeps its traced choice (documented)
    assert recording.calls == 0
    group_attention(q, q, q, 3)  # eager calls follow the context: auto, the recording backend
    assert recording.calls == 1


@pytest.mark.parametrize("head_dim", [6, 42])
def test_sdpa_with_zero_padded_heads_gives_the_same_output_and_gradients(head_dim):
    from vitblocks.attention.backends import sdpa_attention

    torch.manual_seed(0)
    qkv = [torch.randn(2, 9, 3, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    scale = head_dim**-0.5
    padded = sdpa_attention(*qkv, scale, 0.0, head_multiple=8)
    grads = torch.autograd.grad(padded.square().sum(), qkv)
    plain = sdpa_attention(*qkv, scale, 0.0)
    expected = torch.autograd.grad(plain.square().sum(), qkv)
    assert padded.shape == plain.shape == (2, 9, 3, head_dim)
    torch.testing.assert_close(padded, plain)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)
    v = torch.randn(2, 9, 3, 5, dtype=torch.float64)  # values may have their own head size
    torch.testing.assert_close(sdpa_attention(qkv[0], qkv[1], v, scale, 0.0, head_multiple=8),
                               sdpa_attention(qkv[0], qkv[1], v, scale, 0.0))


def test_available_backends_probes_a_real_head_size(monkeypatch):
    sizes = []
    monkeypatch.setattr(backends_module.SdpaBackend, "extra_reasons",
                        lambda self, q, capable: sizes.append(q.shape[-1]) or [])
    assert "sdpa" in available_backends("cpu")
    assert "sdpa" in available_backends("cpu", head_dim=42)
    assert sizes == [32, 42]
