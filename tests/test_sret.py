import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitblocks
from vitblocks.models.sret import SReT, official_drop_path_rates, stage_grids
from vitblocks.profiling import PeakMemory
from vitblocks.summary import summarize

EXACT_PARAMS = {
    ("sret_t", 224): 4_755_979,
    ("sret_lt", 224): 4_988_024,
    ("sret_s", 224): 20_899_692,
    ("sret_t_unsliced", 384): 4_853_259,
    ("sret_s_unsliced", 384): 21_091_212,
    ("sret_s_unsliced", 512): 21_317_004,
}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, img_size", EXACT_PARAMS)
def test_exact_parameter_counts(name, img_size):
    assert count(timm.create_model(name, img_size=img_size)) == EXACT_PARAMS[name, img_size]


def test_registered_names():
    names = set(timm.list_models("sret*"))
    for base in ("sret_t", "sret_lt", "sret_s"):
        assert {base, f"{base}_unsliced"} <= names
    assert {"sret_lt_g16_14_1", "sret_t_unsliced_384", "sret_s_unsliced_384", "sret_s_unsliced_512"} <= names
    assert count(timm.create_model("sret_t_unsliced_384")) == 4_853_259
    tagged = set(timm.list_models("sret*", include_tags=True))
    assert {"sret_t.in1k", "sret_t.distill_in1k", "sret_lt.distill_in1k", "sret_t_unsliced.distill_in1k",
            "sret_lt_unsliced.distill_in1k"} <= tagged


@pytest.mark.parametrize("old, arch", [("sret_t_distill", "sret_t"), ("sret_lt_unsliced_distill", "sret_lt_unsliced")])
def test_distilled_names_are_pretrained_tags_of_the_same_architecture(old, arch):
    with pytest.warns(UserWarning, match=f"deprecated model name {old} to current {arch}.distill_in1k"):
        model = timm.create_model(old, img_size=64, num_classes=3)
    assert model.pretrained_cfg["tag"] == "distill_in1k"
    assert count(model) == count(timm.create_model(f"{arch}.distill_in1k", img_size=64, num_classes=3))
    assert old not in timm.list_models("sret*")


@pytest.mark.parametrize(
    "name, gmacs",
    [("sret_t", 1.112), ("sret_t_unsliced", 1.366), ("sret_lt", 1.164), ("sret_lt_unsliced", 1.418),
     ("sret_lt_g16_14_1", 1.225), ("sret_s", 4.173), ("sret_s_unsliced", 4.671)],
)
def test_macs_at_224_match_the_paper_within_half_a_percent(name, gmacs):
    total = summarize(timm.create_model(name))[-1]
    assert abs(total.macs / 1e9 - gmacs) / gmacs < 0.005


def test_summary_rows_add_up():
    rows = summarize(timm.create_model("sret_t"))
    parts, total = rows[:-1], rows[-1]
    assert [r.name for r in parts if r.name.startswith("stages")] == ["stages.0", "stages.1", "stages.2"]
    assert sum(r.params for r in parts) == total.params
    assert sum(r.macs for r in parts) == total.macs


def test_create_model_kwargs_and_timm_conventions():
    model = timm.create_model("sret_t", num_classes=10, img_size=96, drop_path_rate=0.2)
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model.pretrained_cfg["classifier"] == "head" and model.get_classifier() is model.head
    rates = [b.block.drop_path1.drop_prob for s in model.stages for b in s.blocks
             if hasattr(b.block.drop_path1, "drop_prob")]
    assert max(rates) == pytest.approx(0.2 * 16 / 20)  # stage 3 starts at virtual layer 14, has 3 blocks
    x = torch.randn(2, 3, 96, 96)
    features = model.forward_features(x)
    assert features.shape == (2, 256, 3, 3)
    assert model.forward_head(features, pre_logits=True).shape == (2, 256)
    assert model(x).shape == (2, 10)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 256, 3, 3)
    assert model.no_weight_decay() == {"pos_embed.weight"}
    model.to(torch.float64).reset_classifier(3)  # the new head lives where the model does
    assert model.head.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="global_pool='max': SReT supports 'avg' or ''"):
        model.reset_classifier(3, global_pool="max")


def test_stage_loop_counts_are_read_from_their_layers():
    model = SReT(img_size=64, num_classes=10, unique_blocks=(1, 1, 1), share=("consecutive", "cycle", "consecutive"))
    assert [stage.loops for stage in model.stages] == [2, 2, 2]
    model.set_loops(3)
    assert [stage.loops for stage in model.stages] == [3, 3, 3]


def test_official_drop_path_quirk():
    rates = official_drop_path_rates(0.1, (2, 5, 3), (2, 2, 2))
    # rate * i / 20 over the 20 virtual layers; each stage's unique blocks take the first values of its slice
    assert rates == [[0.1 * i / 20 for i in (0, 1)], [0.1 * i / 20 for i in range(4, 9)],
                     [0.1 * i / 20 for i in (14, 15, 16)]]


def test_group_matcher_covers_every_parameter():
    from timm.models import group_parameters

    model = timm.create_model("sret_t", img_size=64)
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse))
        grouped = [n for names in groups.values() for n in names]
        assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())


def test_features_only_and_forward_intermediates_give_three_stage_maps():
    x = torch.randn(2, 3, 224, 224)
    model = timm.create_model("sret_t", features_only=True)
    maps = model(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 28, 28), (2, 128, 14, 14), (2, 256, 7, 7)]
    assert model.feature_info.channels() == [64, 128, 256] and model.feature_info.reduction() == [8, 16, 32]
    full = timm.create_model("sret_t").eval()
    final, intermediates = full.forward_intermediates(x)
    assert torch.equal(final, full.forward_features(x)) and len(intermediates) == 3
    assert len(full.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)) == 1
    only_two = timm.create_model("sret_t", features_only=True, out_indices=(0, 1))
    assert len(only_two.model.stages) == 2 and len(only_two(x)) == 2


@settings(max_examples=8)
@given(st.integers(64, 160), st.integers(64, 160))
def test_any_image_size_the_groups_fit_runs(h, w):
    model = timm.create_model("sret_t", num_classes=3, img_size=64).eval()
    assert model(torch.randn(1, 3, h, w)).shape == (1, 3)


def test_too_small_image_is_a_clear_error_at_construction_and_call():
    with pytest.raises(ValueError, match=r"img_size=\(16, 16\) is too small: group schedule \(8, 2\) needs at least 8 "
                                         r"tokens but gets 4 \(stage 1's 2x2 map\)"):
        timm.create_model("sret_t", img_size=16)
    model = timm.create_model("sret_t", img_size=64)
    with pytest.raises(ValueError, match=r"\(8, 2\) needs at least 8 tokens on loop 0 but gets 4"):
        model(torch.randn(1, 3, 16, 16))
    assert stage_grids((224, 224), 3) == [(28, 28), (14, 14), (7, 7)]


def test_eval_is_deterministic_and_official_mode_is_not():
    x = torch.randn(1, 3, 64, 64)
    model = timm.create_model("sret_t", img_size=64).eval()
    assert model(x).equal(model(x))
    official = timm.create_model("sret_t", img_size=64, eval_permutation="official").eval()
    official.load_state_dict(model.state_dict())
    assert not official(x).equal(official(x))


def test_grad_checkpointing_keeps_gradients():
    model = timm.create_model("sret_t", img_size=64, num_classes=4, drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for mode in (False, True, "sqrt"):
        model.zero_grad()
        model.set_grad_checkpointing(mode)
        torch.manual_seed(0)
        model(x).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="grad_checkpointing='everything'"):
        model.set_grad_checkpointing("everything")


@pytest.mark.slow  # trains 1000 applications
def test_thousand_applications_fit_in_fifteen_million_parameters_and_train():
    model = timm.create_model("sret_t", img_size=32, num_classes=10, loops=100, mix="shared", grad_checkpointing="sqrt")
    applications = sum(b.loops for s in model.stages for b in s.blocks)
    assert applications == 1000
    assert count(model) < 15_000_000
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def activation_peak(loops, mode):
    model = SReT(img_size=32, num_classes=10, unique_blocks=(1, 1, 1), loops=loops, mix="shared",
                 grad_checkpointing=mode).train()
    x = torch.randn(2, 3, 32, 32)
    with PeakMemory() as memory:
        model(x).sum().backward()
    return memory.peak - memory.current  # what is held beyond the parameter gradients


@pytest.mark.slow
def test_peak_activation_memory_stays_flat_as_loops_grow():
    plain = activation_peak(10, False), activation_peak(100, False)
    sqrt = activation_peak(10, "sqrt"), activation_peak(100, "sqrt")
    assert plain[1] > 6 * plain[0]   # without checkpointing memory follows the loops
    assert sqrt[1] < 2 * sqrt[0]     # with nested checkpointing it barely moves
    assert sqrt[1] < plain[1] / 10


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    # SReT-T's layout with one block per stage, to keep compile time short
    model = SReT(img_size=64, num_classes=10, unique_blocks=(1, 1, 1)).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_sret_is_exported_at_top_level():
    assert vitblocks.SReT is SReT


@pytest.mark.parametrize("name", timm.list_models("sret*", include_tags=True))
def test_pretrained_cfg_is_a_model_card_consistent_with_the_model(name):
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.origin_url == "https://github.com/szq0214/SReT" and cfg.paper_ids == "arXiv:2111.05297"
    assert cfg.license == "mit" and cfg.notes
    model = timm.create_model(name.split(".")[0]).eval()
    size = cfg.input_size[-1]
    if size <= 224:  # the 384/512 maps follow the same stage_grids rule; 224 keeps the test quick
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, *cfg.input_size))
        assert tuple(features.shape[-2:]) == cfg.pool_size
        assert features.shape[1] == model.num_features == model.head_hidden_size
    assert cfg.pool_size == (size // 32, size // 32)
    assert model.get_submodule(cfg.first_conv).in_channels == 3
    assert model.get_submodule(cfg.classifier) is model.get_classifier()


def test_pretrained_without_weights_says_how_to_load_the_official_ones():
    with pytest.raises(ValueError,
                       match=r"sret_t has no weights to download.*load_official_checkpoint.*pretrained_cfg_overlay"):
        timm.create_model("sret_t", pretrained=True)


def test_weights_reload_through_timms_checkpoint_path_and_file_overlay(tmp_path):
    from safetensors.torch import save_file

    kwargs = dict(img_size=32, num_classes=3, embed_dims=(16, 32, 64), num_heads=(1, 2, 4), groups=((4, 2), (1,), (1,)))
    model = timm.create_model("sret_t", **kwargs).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.safetensors"):
        for how in (dict(checkpoint_path=str(tmp_path / file)),
                    # as for timm's own models, the cfg says how many classes the file has (else the head is new)
                    dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / file), num_classes=3))):
            torch.testing.assert_close(timm.create_model("sret_t", **kwargs, **how).eval()(x), model(x))
