import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vitblocks import ConvPool, ConvStem, PositionMap
from vitblocks.layers import resize_position_map


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_stem_shapes_and_parameter_layout():
    stem = ConvStem(3, 64)
    assert stem(torch.randn(2, 3, 224, 224)).shape == (2, 64, 28, 28)
    convs = [stem.conv1, stem.conv2, stem.conv3]
    assert [(c.in_channels, c.out_channels, c.stride, c.padding) for c in convs] == [
        (3, 32, (2, 2), (1, 1)), (32, 64, (2, 2), (1, 1)), (64, 64, (2, 2), (1, 1))
    ]
    assert all(c.bias is not None for c in convs)
    assert count(stem) == (3 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + (64 * 64 * 9 + 64) + 2 * (32 + 64 + 64)


@given(st.integers(8, 80), st.integers(8, 80))
def test_stem_reduces_any_size_by_eight_rounding_up(h, w):
    out = ConvStem(3, 8).eval()(torch.randn(1, 3, h, w))
    assert out.shape[-2:] == (-(-h // 8), -(-w // 8))



@pytest.mark.parametrize("shape, fix", [
    ((3, 32, 32), r"got \(3, 32, 32\): add the batch dimension \(images.unsqueeze\(0\)\)"),
    ((2, 1, 32, 32), r"got \(2, 1, 32, 32\): the model takes 3-channel images \(create it with in_chans=1"),
    ((32, 32), r"images of shape \(batch, 3, height, width\), got \(32, 32\)$"),
])
def test_stem_refuses_what_is_not_a_batch_of_its_images_saying_what_to_change(shape, fix):
    with pytest.raises(ValueError, match=fix):
        ConvStem(3, 8)(torch.randn(shape))


def test_the_stem_input_check_stays_in_fx_graphs_and_leaves_exports_unchanged():
    stem = ConvStem(3, 8).eval()
    images = torch.randn(2, 3, 16, 16)
    traced = torch.fx.symbolic_trace(stem)
    assert any(node.target.__name__ == "checked_images" for node in traced.graph.nodes if node.op == "call_function")
    torch.testing.assert_close(traced(images), stem(images))
    with pytest.raises(ValueError, match="add the batch dimension"):
        traced(images[0])
    exported = torch.export.export(stem, (images,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    other = torch.randn(5, 3, 16, 16)
    torch.testing.assert_close(exported.module()(other), stem(other))


def test_pool_is_a_strided_depthwise_convolution():
    pool = ConvPool(64, 128)
    assert pool(torch.randn(1, 64, 28, 28)).shape == (1, 128, 14, 14)
    assert pool.conv.groups == 64 and pool.conv.kernel_size == (3, 3)
    assert count(pool) == 128 * 9 + 128
    with pytest.raises(ValueError, match="out_dim=100 must be a multiple of in_dim=64"):
        ConvPool(64, 100)


def test_position_map_adds_itself_at_its_own_size():
    pos = PositionMap(16, 7)
    x = torch.randn(2, 16, 7, 7)
    assert pos(x).equal(x + pos.weight)
    assert 0 < pos.weight.std() < 0.05


@given(st.integers(1, 40), st.integers(1, 40))
def test_resizing_keeps_a_constant_map_constant(h, w):
    constant = torch.full((1, 3, 7, 7), 0.3)
    torch.testing.assert_close(resize_position_map(constant, (h, w)), torch.full((1, 3, h, w), 0.3))


def test_position_map_resizes_bicubically_for_other_inputs():
    pos = PositionMap(4, (14, 14))
    out = pos(torch.zeros(1, 4, 24, 24))
    assert out.shape == (1, 4, 24, 24)
    # a map that varies linearly along one axis is reproduced exactly in the interior
    ramp = torch.linspace(-1, 1, 14).expand(1, 4, 14, 14).contiguous()
    resized = resize_position_map(ramp, (28, 28))
    assert torch.all(resized[..., 4:-4].diff(dim=-1) > 0)


def test_position_map_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"expects \(batch, 16, height, width\)"):
        PositionMap(16, 7)(torch.zeros(1, 8, 7, 7))


def test_stem_runs_channels_last_so_tokens_flatten_without_a_copy():
    out = ConvStem(3, 16)(torch.randn(2, 3, 32, 32))
    assert out.is_contiguous(memory_format=torch.channels_last)
    tokens = out.flatten(2).transpose(1, 2)
    assert tokens.is_contiguous() and tokens.data_ptr() == out.data_ptr()
