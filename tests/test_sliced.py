import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from timm.layers import Attention

from reference import dense_group_mask, masked_attention
from vitblocks import SlicedGroupAttention
from vitblocks.attention import available_backends


def reference_forward(module, x, order, groups):
    """Sliced attention computed densely in the original token order."""
    b, length, c = x.shape
    p = module.num_prefix_tokens
    q, k, v = module.qkv(x).reshape(b, length, 3, module.num_heads, c // module.num_heads).unbind(2)
    mask = dense_group_mask(length - p, groups, p, order)
    out = masked_attention(q, k, v, mask).to(x.dtype).reshape(b, length, c)
    return module.proj(out)


@st.composite
def sliced_cases(draw):
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.sampled_from([2, 4]))
    n = draw(st.integers(1, 40))
    schedule = tuple(draw(st.lists(st.integers(1, n), min_size=1, max_size=3)))
    prefix = draw(st.integers(0, 2))
    loop = draw(st.integers(0, 3))
    policy = draw(st.sampled_from(["random", "fixed", "none"]))
    training = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    backend = draw(st.sampled_from(available_backends("cpu")))
    seed = draw(st.integers(0, 2**16))
    return heads, dim, n, schedule, prefix, loop, policy, training, batch, backend, seed


@given(case=sliced_cases())
def test_sliced_attention_equals_dense_masked_attention(case):
    heads, dim, n, schedule, prefix, loop, policy, training, batch, backend, seed = case
    torch.manual_seed(seed)
    module = SlicedGroupAttention(
        dim, heads, groups=schedule, num_prefix_tokens=prefix,
        permutation=policy, eval_permutation=policy, seed=seed, backend=backend,
    ).double().train(training)
    x = torch.randn(batch, prefix + n, dim, dtype=torch.float64)
    g = schedule[min(loop, len(schedule) - 1)]

    torch.manual_seed(seed)
    out = module(x, loop=loop)

    order = None
    if loop > 0 and g > 1 and policy != "none":
        if policy == "random":  # the module must have drawn torch.randperm(n) first
            torch.manual_seed(seed)
            order = torch.randperm(n)
        else:
            order = module.permutation_at(n, loop)
            assert order is not None and sorted(order.tolist()) == list(range(n))
    torch.testing.assert_close(out, reference_forward(module, x, order, g), rtol=1e-9, atol=1e-9)


def test_one_group_matches_timm_attention_with_the_same_weights():
    timm_attn = Attention(48, num_heads=4, qkv_bias=True)
    ours = SlicedGroupAttention(48, num_heads=4, groups=1)
    missing = ours.load_state_dict(timm_attn.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    x = torch.randn(2, 50, 48)
    torch.testing.assert_close(ours(x), timm_attn(x), rtol=1e-5, atol=1e-5)
    assert timm_attn.load_state_dict(ours.state_dict())  # and back


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(scale_norm=True), dict(proj_bias=False)])
def test_options_keep_timm_parameter_names_and_outputs(options):
    timm_attn = Attention(32, num_heads=2, qkv_bias=True, norm_layer=torch.nn.LayerNorm, **options)
    ours = SlicedGroupAttention(32, 2, **options)
    ours.load_state_dict(timm_attn.state_dict())
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(ours(x), timm_attn(x), rtol=1e-5, atol=1e-5)


def test_drops_into_timm_vit_block_as_attn_layer():
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    reference = Block(32, 2, qkv_bias=True)
    torch.manual_seed(0)
    ours = Block(32, 2, qkv_bias=True, attn_layer=SlicedGroupAttention)
    assert isinstance(ours.attn, SlicedGroupAttention)
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_masks_are_refused_with_a_reason():
    module = SlicedGroupAttention(16, 2)
    with pytest.raises(ValueError, match="takes no attn_mask"):
        module(torch.randn(1, 4, 16), attn_mask=torch.ones(4, 4, dtype=torch.bool))


def test_first_loop_uses_contiguous_chunks_without_permutation():
    module = SlicedGroupAttention(8, 2, groups=(4, 2)).eval()
    assert module.permutation_at(16, 0) is None
    assert module.permutation_at(16, 1) is not None
    assert module.groups_at(0) == 4 and module.groups_at(1) == 2 and module.groups_at(5) == 2


def test_eval_with_fixed_policy_is_deterministic():
    module = SlicedGroupAttention(16, 2, groups=(4, 4)).eval()
    x = torch.randn(2, 37, 16)
    first = module(x, loop=1)
    torch.manual_seed(123)  # the global RNG must not matter
    assert module(x, loop=1).equal(first)


def test_training_with_random_policy_varies_between_calls():
    module = SlicedGroupAttention(16, 2, groups=(4, 4)).train()
    x = torch.randn(2, 64, 16)
    assert not torch.allclose(module(x, loop=1), module(x, loop=1))


def test_random_eval_policy_reproduces_official_behaviour():
    module = SlicedGroupAttention(16, 2, groups=(4, 4), eval_permutation="random").eval()
    x = torch.randn(1, 64, 16)
    torch.manual_seed(0)
    a = module(x, loop=1)
    b = module(x, loop=1)
    torch.manual_seed(0)
    assert module(x, loop=1).equal(a) and not torch.allclose(a, b)


def test_arbitrary_tokens_with_class_and_distillation_tokens():
    module = SlicedGroupAttention(24, 3, groups=(7, 3), num_prefix_tokens=2).eval()
    x = torch.randn(2, 2 + 197, 24)
    for loop in range(3):
        assert module(x, loop=loop).shape == x.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=30, num_heads=4), "dim=30 must be divisible by num_heads=4"),
        (dict(dim=32, num_heads=4, groups=0), "groups"),
        (dict(dim=32, num_heads=4, groups=(8, 0)), "groups"),
        (dict(dim=32, num_heads=4, groups=()), "groups"),
        (dict(dim=32, num_heads=4, groups=2.5), "groups"),
        (dict(dim=32, num_heads=4, permutation="shuffle"), "permutation='shuffle'"),
        (dict(dim=32, num_heads=4, num_prefix_tokens=-1), "num_prefix_tokens"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlicedGroupAttention(**kwargs)


def test_more_groups_than_tokens_raise_at_call_time():
    module = SlicedGroupAttention(16, 2, groups=(8, 16), num_prefix_tokens=1)
    module(torch.randn(1, 1 + 8, 16), loop=0)
    with pytest.raises(ValueError, match=r"group schedule \(8, 16\) needs at least 16 tokens on loop 1 "
                                         r"but gets 8 \(patch tokens\)"):
        module(torch.randn(1, 1 + 8, 16), loop=1)


def test_attention_dropout_only_in_training():
    module = SlicedGroupAttention(16, 2, groups=2, attn_drop=0.5)
    x = torch.randn(1, 32, 16)
    module.eval()
    assert module(x).equal(module(x))
    module.train()
    assert not module(x).equal(module(x))
