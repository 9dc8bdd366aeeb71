import pytest
import timm
import torch

import vitblocks  # noqa: F401
from official_sret import OfficialSReT, randomize_
from vitblocks.models.official import (
    CheckpointError,
    export_official_state_dict,
    load_official_checkpoint,
    read_checkpoint,
)

TINY = dict(dims=(64, 128, 256), heads=(2, 4, 8), mlp_ratio=3.6, mix_ratio=1.0)


@pytest.fixture(scope="module")
def official_t():
    return randomize_(OfficialSReT(**TINY, image_size=64, num_classes=10)).eval()


@pytest.fixture
def checkpoint(tmp_path, official_t):
    path = tmp_path / "SReT_T.pth"
    torch.save({"model": official_t.state_dict(), "epoch": 299}, path)
    return path


def images(size=64, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_official_layout_stores_shared_blocks_twice(official_t):
    state = official_t.state_dict()
    assert torch.equal(state["transformers.1.blocks.4.attn.qkv.weight"],
                       state["transformers.1.blocks.6.attn.qkv.weight"])
    assert "transformers.1.blocks.5.coefficient2.bias" in state


def test_loaded_model_matches_official_outputs_with_official_permutations(checkpoint, official_t):
    model = load_official_checkpoint(
        checkpoint, "sret_t", num_classes=10, img_size=64, eval_permutation="official", backend="math"
    )
    x = images()
    torch.manual_seed(5)
    expected = official_t(x)
    torch.manual_seed(5)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_unsliced_model_matches_official_outputs_with_every_backend(tmp_path):
    official = randomize_(OfficialSReT(**TINY, groups1=(1, 1, 1), groups2=(1, 1, 1), image_size=64, num_classes=10))
    torch.save({"model": official.state_dict()}, tmp_path / "u.pth")
    model = load_official_checkpoint(tmp_path / "u.pth", "sret_t_unsliced", num_classes=10, img_size=64)
    x = images()
    for backend in vitblocks.attention.available_backends("cpu"):
        with vitblocks.attention_backend(backend):
            torch.testing.assert_close(model(x), official.eval()(x), rtol=1e-5, atol=1e-5)


def test_default_eval_is_deterministic_unlike_the_official_code(checkpoint, official_t):
    model = load_official_checkpoint(checkpoint, "sret_t", num_classes=10, img_size=64)
    x = images()
    assert model(x).equal(model(x))
    assert not torch.equal(official_t(x), official_t(x))


def test_small_variant_and_timm_pretrained_file_loading(tmp_path):
    official = randomize_(OfficialSReT(dims=(126, 252, 504), heads=(3, 6, 12), mlp_ratio=3.0, mix_ratio=2.0,
                                       groups1=(1, 1, 1), groups2=(1, 1, 1), image_size=64))
    path = tmp_path / "SReT_S.pth"
    torch.save({"model": official.state_dict()}, path)
    model = timm.create_model(
        "sret_s_unsliced", pretrained=True, img_size=64, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    torch.testing.assert_close(model(images()), official.eval()(images()), rtol=1e-5, atol=1e-5)


def test_export_round_trips_to_the_official_layout(checkpoint, official_t):
    model = load_official_checkpoint(checkpoint, "sret_t", num_classes=10, img_size=64)
    exported = export_official_state_dict(model)
    original = official_t.state_dict()
    assert exported.keys() == original.keys()
    for key in original:
        assert torch.equal(exported[key], original[key]), key
    fresh = OfficialSReT(**TINY, image_size=64, num_classes=10)
    fresh.load_state_dict(exported)


def test_position_map_is_resized_for_a_larger_input(checkpoint, official_t):
    model = load_official_checkpoint(checkpoint, "sret_t", num_classes=10, img_size=96)
    assert model.pos_embed.weight.shape == (1, 64, 12, 12)
    assert model(images(96)).shape == (2, 10)
    # a 224-trained model runs at 384 with its map resized
    small = timm.create_model("sret_t_unsliced", img_size=224)
    big = timm.create_model("sret_t_unsliced_384")
    big.load_state_dict(vitblocks.models.sret_variants.checkpoint_filter_fn(small.state_dict(), big))
    assert big.pos_embed.weight.shape == (1, 64, 48, 48)


def test_differing_copies_of_a_shared_block_are_refused(tmp_path, official_t):
    state = {k: v.clone() for k, v in official_t.state_dict().items()}
    state["transformers.0.blocks.2.mlp.fc1.weight"] += 1e-3
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError,
                       match=r"blocks\.0\.mlp\.fc1\.weight and .*blocks\.2\.mlp\.fc1\.weight .* differ"):
        load_official_checkpoint(tmp_path / "bad.pth", "sret_t", num_classes=10, img_size=64)


def test_missing_keys_name_them(tmp_path, official_t):
    state = dict(official_t.state_dict())
    del state["transformers.2.blocks.5.mlp.fc2.bias"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing 1 keys.*transformers\.2\.blocks\.5\.mlp\.fc2\.bias"):
        load_official_checkpoint(tmp_path / "partial.pth", "sret_t", num_classes=10, img_size=64)


def test_wrong_variant_is_a_clear_error(checkpoint):
    with pytest.raises(CheckpointError, match="another variant"):
        load_official_checkpoint(checkpoint, "sret_lt", num_classes=10, img_size=64)


def test_truncated_file_is_a_clear_error(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_never_executed(tmp_path, capsys):
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused for safety"):
        read_checkpoint(tmp_path / "evil.pth")
    assert "must never run" not in capsys.readouterr().out


def test_vitblocks_checkpoints_are_pointed_elsewhere(tmp_path):
    torch.save(timm.create_model("sret_t", img_size=64).state_dict(), tmp_path / "ours.pth")
    with pytest.raises(CheckpointError, match="not in the official SReT layout"):
        load_official_checkpoint(tmp_path / "ours.pth", "sret_t", img_size=64)


def test_shared_mix_models_have_no_official_layout():
    model = timm.create_model("sret_t", img_size=64, mix="shared")
    with pytest.raises(CheckpointError, match="mix='per_loop'"):
        export_official_state_dict(model)
