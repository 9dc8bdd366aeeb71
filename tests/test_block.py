import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from vitblocks import NonLinearMix, SlicedGroupAttention, TransformerBlock


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_block_matches_timm_vit_block_with_the_same_weights():
    ours = TransformerBlock(64, 4, mlp_ratio=3.0)
    theirs = Block(64, 4, mlp_ratio=3.0, qkv_bias=True, norm_layer=nn.LayerNorm)
    for m in (ours.norm1, ours.norm2):
        m.eps = 1e-5
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 20, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_residual_scalars_add_four_parameters_initialised_to_one():
    plain, scaled = TransformerBlock(32, 2), TransformerBlock(32, 2, residual_scalars=True)
    assert count(scaled) - count(plain) == 4
    scaled.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 9, 32)
    torch.testing.assert_close(scaled(x), plain(x))


def test_residual_scalars_follow_the_spec_formula():
    block = TransformerBlock(16, 2, residual_scalars=True)
    with torch.no_grad():
        block.skip_scale1.fill_(0.5)
        block.branch_scale1.fill_(2.0)
        block.skip_scale2.fill_(-1.0)
        block.branch_scale2.fill_(3.0)
    x = torch.randn(1, 6, 16)
    u = 0.5 * x + 2.0 * block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), -1.0 * u + 3.0 * block.mlp(block.norm2(u)))


def test_mlp_hidden_width_truncates_like_the_paper():
    block = TransformerBlock(64, 2, mlp_ratio=3.6)
    assert block.mlp.fc1.out_features == int(64 * 3.6) == 230


def test_loop_index_reaches_the_attention_layer():
    block = TransformerBlock(16, 2, groups=(4, 2)).eval()
    x = torch.randn(1, 16, 16)
    attn_in = block.norm1(x)
    for loop in (0, 1):
        expected = x + block.attn(attn_in, loop=loop)
        expected = expected + block.mlp(block.norm2(expected))
        torch.testing.assert_close(block(x, loop=loop), expected)
    assert not torch.allclose(block(x, loop=0), block(x, loop=1))


def test_other_attention_layers_norms_and_activations_plug_in():
    from timm.layers import Attention

    block = TransformerBlock(32, 4, attn_layer=Attention, norm_layer=nn.LayerNorm, act_layer=nn.ReLU)
    assert isinstance(block.attn, Attention) and isinstance(block.mlp.act, nn.ReLU)
    assert block(torch.randn(2, 5, 32), loop=3).shape == (2, 5, 32)  # loop ignored: Attention takes none


def test_attention_kwargs_are_forwarded():
    block = TransformerBlock(32, 4, groups=(8, 2), num_prefix_tokens=1, eval_permutation="none")
    assert isinstance(block.attn, SlicedGroupAttention)
    assert block.attn.groups == (8, 2) and block.attn.num_prefix_tokens == 1


def test_drop_path_is_active_only_in_training():
    block = TransformerBlock(16, 2, drop_path=0.5)
    x = torch.randn(32, 4, 16)
    block.eval()
    assert block(x).equal(block(x))
    block.train()
    torch.manual_seed(0)
    assert not block(x).equal(block(x))


def test_non_linear_mix_formula_and_parameter_count():
    mix = NonLinearMix(64, mlp_ratio=2.0)
    assert count(mix) == 2 * 64 + (64 * 128 + 128) + (128 * 64 + 64) + 2
    with torch.no_grad():
        mix.skip_scale.fill_(0.25)
        mix.branch_scale.fill_(-2.0)
    x = torch.randn(2, 7, 64)
    torch.testing.assert_close(mix(x), 0.25 * x - 2.0 * mix.mlp(mix.norm(x)))
    assert isinstance(mix.mlp.act, nn.GELU) and mix.norm.eps == 1e-6


@pytest.mark.parametrize("dim, heads", [(30, 4), (16, 0)])
def test_block_rejects_heads_that_do_not_divide_dim(dim, heads):
    with pytest.raises(ValueError, match="num_heads"):
        TransformerBlock(dim, heads)
