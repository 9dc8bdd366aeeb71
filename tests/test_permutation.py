import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vitblocks.layers import (
    cached_fixed_permutation,
    fixed_permutation,
    inverse_permutation,
    permute_tokens,
    random_permutation,
)
from vitblocks.layers.permutation import check_policy


@given(st.integers(1, 500), st.integers(0, 2**40))
def test_fixed_permutation_is_a_permutation_and_repeatable(n, seed):
    perm = fixed_permutation(n, seed)
    assert perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(n))
    assert perm.equal(fixed_permutation(n, seed))


def test_fixed_permutation_depends_on_seed_and_actually_shuffles():
    a, b = fixed_permutation(196, 0), fixed_permutation(196, 1)
    assert not a.equal(b)
    assert not a.equal(torch.arange(196))
    # tokens that share a contiguous chunk after shuffling come from all over the image
    chunk = a[: 196 // 2].float()
    assert chunk.min() < 20 and chunk.max() > 176


@given(st.integers(1, 300), st.integers(0, 1000))
def test_inverse_permutation_is_exact(n, seed):
    perm = fixed_permutation(n, seed)
    inverse = inverse_permutation(perm)
    assert perm[inverse].equal(torch.arange(n))
    assert inverse[perm].equal(torch.arange(n))


@given(st.integers(1, 50), st.integers(0, 3), st.integers(0, 100))
def test_permute_then_inverse_is_identity_and_keeps_prefix(n, prefix, seed):
    x = torch.randn(2, prefix + n, 5)
    perm = fixed_permutation(n, seed)
    shuffled = permute_tokens(x, perm, prefix)
    assert shuffled[:, :prefix].equal(x[:, :prefix])
    assert shuffled[:, prefix:].equal(x[:, prefix:][:, perm])
    assert permute_tokens(shuffled, inverse_permutation(perm), prefix).equal(x)


def test_random_permutation_follows_the_global_cpu_seed():
    torch.manual_seed(7)
    a = random_permutation(50)
    torch.manual_seed(7)
    assert a.equal(torch.randperm(50))
    assert not a.equal(random_permutation(50))


def test_unknown_policy_names_the_argument():
    with pytest.raises(ValueError, match="eval_permutation='shuffle'"):
        check_policy("shuffle", "eval_permutation")


def test_device_and_cpu_generator_policies_draw_the_same_stream_on_the_cpu():
    torch.manual_seed(3)
    on_device = random_permutation(64)
    torch.manual_seed(3)
    assert on_device.equal(random_permutation(64, on_cpu_generator=True))


@given(st.integers(1, 300), st.integers(0, 10**6))
def test_cached_fixed_permutation_is_the_fixed_one_and_its_inverse(n, seed):
    perm = cached_fixed_permutation(n, seed, "cpu")
    assert perm.equal(fixed_permutation(n, seed))
    assert cached_fixed_permutation(n, seed, "cpu", inverse=True).equal(inverse_permutation(perm))
    assert cached_fixed_permutation(n, seed, "cpu") is perm  # looked up, not recomputed


@pytest.mark.slow  # compiles
def test_compiled_eval_holds_fixed_permutations_as_constants():
    import timm

    import vitblocks  # noqa: F401

    model = timm.create_model("sret_t", img_size=64, num_classes=10).eval()
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    x = torch.randn(2, 3, 64, 64)
    out = torch.compile(model, backend=capture, fullgraph=True)(x)
    torch.testing.assert_close(out, model(x))
    targets = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    assert graphs and not [t for t in targets if "sort" in t or "xor" in t or "rshift" in t], targets


@pytest.mark.parametrize("tracer", ["export_strict", "export_non_strict", "jit_trace"])
def test_traced_graphs_hold_the_fixed_permutation_as_one_constant(tracer):
    """The permutation is computed outside the tracer: no hash or sort ops in the graph, and
    the cache keeps a real tensor (not a tracer's fake one) for later calls."""
    import vitblocks.layers.permutation as permutation
    from vitblocks.layers import SlicedGroupAttention

    class SecondLoop(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SlicedGroupAttention(16, 2, groups=(4, 2), num_prefix_tokens=1, seed=len(tracer))

        def forward(self, x):
            return self.attn(x, loop=1)

    layer, x = SecondLoop().eval(), torch.randn(2, 1 + 37, 16)
    if tracer == "jit_trace":
        graph = torch.jit.trace(layer, x).inlined_graph
        ops = {node.kind() for node in graph.nodes()}
        traced_out = torch.jit.trace(layer, x)(x)
    else:
        program = torch.export.export(layer, (x,), strict=tracer == "export_strict")
        ops = {str(node.target) for node in program.graph.nodes}
        traced_out = program.module()(x)
    assert not [op for op in ops if "sort" in op or "xor" in op or "rshift" in op], ops
    torch.testing.assert_close(traced_out, layer(x))
    cached = [t for key, t in permutation._FIXED_TENSORS.items() if key[0] == 37]
    assert cached and all(type(t) is torch.Tensor for t in cached)
