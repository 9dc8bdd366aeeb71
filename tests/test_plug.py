import pytest
import timm
import torch

import vitblocks  # noqa: F401
from vitblocks import NonLinearMix, Recursive, SlicedGroupAttention
from vitblocks.models.plug import load_base_weights, make_recursive, recursion_plan_of
from vitblocks.models.plugged_variants import VARIANTS

BASES = ["deit_tiny_patch16_224", "pit_ti_224", "swin_tiny_patch4_window7_224"]
BASE_PARAMS = {"deit_tiny_patch16_224": 5_717_416, "pit_ti_224": 4_847_272, "swin_tiny_patch4_window7_224": 28_288_354}


def count(module):
    return sum(p.numel() for p in module.parameters())


def images(size=224, batch=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def stacks(model):
    return [m for n, m in model.named_modules() if n.split(".")[-1] == "blocks" and isinstance(m, torch.nn.Sequential)]


@pytest.mark.parametrize("base", BASES)
def test_one_loop_without_mix_reproduces_the_base_model_exactly(base):
    reference = timm.create_model(base).eval()
    model = timm.create_model(base).eval()
    model.load_state_dict(reference.state_dict())
    make_recursive(model, loops=1)
    assert count(model) == BASE_PARAMS[base]
    with torch.no_grad():
        assert torch.equal(model(images()), reference(images()))


@pytest.mark.parametrize("base", BASES)
def test_intended_parameter_counts(base):
    blocks = [b for s in stacks(timm.create_model(base)) for b in s]
    block_params = [count(b) for b in blocks]
    mix_params = [count(NonLinearMix(b.norm1.normalized_shape[0])) for b in blocks]
    deep = timm.create_model(base)
    make_recursive(deep, loops=2)
    assert count(deep) == BASE_PARAMS[base]  # same parameters, twice the depth
    unit = 2 if "swin" in base else 1  # Swin recurses (W-MSA, SW-MSA) pairs
    mixed = timm.create_model(base)
    make_recursive(mixed, loops=2, mix="per_loop")
    assert count(mixed) == BASE_PARAMS[base] + 2 * sum(mix_params[::unit])  # a mix after each of 2 loops per unit
    shared = timm.create_model(base)
    make_recursive(shared, loops=2, share=True)
    dropped = 0
    for stack in stacks(timm.create_model(base)):
        for start in range(0, len(stack), 2 * unit):
            dropped += sum(count(b) for b in list(stack)[start + unit : start + 2 * unit])
    assert count(shared) == BASE_PARAMS[base] - dropped
    assert (sum(isinstance(m, Recursive) for m in shared.modules())
            == sum(-(-len(s) // (2 * unit)) for s in stacks(timm.create_model(base))))
    assert block_params  # sanity: every family has blocks


@pytest.mark.parametrize(
    "name, sizes",
    [("deit_tiny_rec_sliced_patch16_224", (224, 160)), ("pit_ti_rec_sliced_224", (224, 160)),
     ("swin_tiny_shared_patch4_window7_224", (224,))],
)
def test_forward_and_backward_at_several_sizes(name, sizes):
    for size in sizes:
        model = timm.create_model(name, img_size=size, num_classes=5).train()
        out = model(images(size, batch=2))
        assert out.shape == (2, 5)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    swin = timm.create_model("swin_tiny_rec_patch4_window7_224", img_size=256, window_size=8, num_classes=5)
    assert swin(images(256)).shape == (1, 5)


def applied_shifts(model):
    shifts = []
    for module in model.modules():
        if hasattr(module, "shift_size"):
            module.register_forward_pre_hook(lambda m, args: shifts.append(max(m.shift_size)))
    with torch.no_grad():
        model(images())
    return shifts


def test_swin_recursion_keeps_the_shift_alternation():
    base = applied_shifts(timm.create_model("swin_tiny_patch4_window7_224").eval())
    assert base[:4] == [0, 3, 0, 3]
    recursive = applied_shifts(timm.create_model("swin_tiny_rec_patch4_window7_224").eval())
    pairs = [base[i : i + 2] for i in range(0, len(base), 2)]
    assert recursive == [shift for pair in pairs for shift in pair * 2]  # W, SW, W, SW per pair


def test_deit_class_and_distillation_tokens_are_prefix_tokens():
    model = timm.create_model("deit_tiny_distilled_patch16_224").eval()
    make_recursive(model, loops=2, groups=(4, 2))
    attns = [m for m in model.modules() if isinstance(m, SlicedGroupAttention)]
    assert len(attns) == 12 and {a.num_prefix_tokens for a in attns} == {2}
    assert model(images()).shape == (1, 1000)
    sliced = timm.create_model("deit_tiny_rec_sliced_patch16_224")
    assert {m.num_prefix_tokens for m in sliced.modules() if isinstance(m, SlicedGroupAttention)} == {1}


def test_sliced_attention_with_one_group_keeps_the_base_outputs():
    reference = timm.create_model("pit_ti_224").eval()
    model = timm.create_model("pit_ti_224").eval()
    model.load_state_dict(reference.state_dict())
    make_recursive(model, loops=1, groups=(1,))
    torch.testing.assert_close(model(images()), reference(images()), rtol=1e-5, atol=1e-5)


def test_base_weights_load_into_the_shared_form_with_a_report():
    base = timm.create_model("deit_tiny_patch16_224")
    model = timm.create_model("deit_tiny_shared_patch16_224")
    report = load_base_weights(model, base.state_dict())
    assert torch.equal(model.blocks[1].block.attn.qkv.weight, base.blocks[2].attn.qkv.weight)
    assert (any(k.startswith("blocks.3.") for k in report.unused)
            and not any(k.startswith("blocks.2.") for k in report.unused))
    assert report.new and all(".mix." in k for k in report.new)
    assert torch.equal(model.head.weight, base.head.weight) and "loaded" in str(report)


def test_pretrained_base_weights_flow_into_registered_variants(tmp_path):
    base = timm.create_model("pit_ti_224")
    torch.save(base.state_dict(), tmp_path / "pit.pth")
    model = timm.create_model("pit_ti_shared_224", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "pit.pth")))
    assert torch.equal(model.transformers[1].blocks[0].block.mlp.fc1.weight,
                       base.transformers[1].blocks[0].mlp.fc1.weight)


def test_timm_api_still_works():
    model = timm.create_model("deit_tiny_rec_patch16_224")
    assert model.forward_features(images()).shape == (1, 197, 192)
    model.reset_classifier(7)
    assert model(images()).shape == (1, 7)
    features = timm.create_model("swin_tiny_rec_patch4_window7_224", features_only=True)
    assert [tuple(f.shape) for f in features(images())] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384),
                                                            (1, 7, 7, 768)]
    pit = timm.create_model("pit_ti_rec_224", features_only=True)
    assert [f.shape[1] for f in pit(images())] == [64, 128, 256]


def test_registered_variants_and_cfgs():
    assert set(VARIANTS) <= set(timm.list_models())
    for name, (base, _) in VARIANTS.items():
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == timm.models.get_pretrained_cfg(base).input_size


def test_bad_requests_are_clear_errors():
    with pytest.raises(ValueError, match="Swin attention is already windowed"):
        make_recursive(timm.create_model("swin_tiny_patch4_window7_224"), groups=(4, 2))
    with pytest.raises(ValueError, match="mix='every'"):
        make_recursive(timm.create_model("deit_tiny_patch16_224"), mix="every")
    with pytest.raises(ValueError, match="no nn.Sequential 'blocks'"):
        make_recursive(timm.create_model("resnet18"))
    with pytest.raises(ValueError, match="3 schedules for 1 block stacks"):
        make_recursive(timm.create_model("deit_tiny_patch16_224"), groups=((4,), (2,), (1,)))


@pytest.mark.parametrize("base, kwargs", [("deit_tiny_patch16_224", dict(share=True, loops=3)),
                                          ("swin_tiny_patch4_window7_224", dict(share=True)),
                                          ("pit_ti_224", dict(loops=2, groups=((8, 2), (4, 1), (1, 1))))])
def test_make_recursive_returns_its_plan_and_the_plan_can_be_recovered(base, kwargs):
    original = timm.create_model(base)
    model = timm.create_model(base)
    plan = make_recursive(model, **kwargs)
    assert not hasattr(model, "recursion_plan")
    assert recursion_plan_of(model, original.state_dict()) == plan
    report = load_base_weights(model, original.state_dict(), plan)
    assert not report.new and all(plan.new_path(k) is None for k in report.unused)


def test_plan_runs_put_every_unit_in_exactly_one_run():
    from vitblocks.layers.sharing import runs_of, sharing_assignment

    for units in range(1, 9):
        for loops in range(1, 5):
            for share in (False, True):  # consecutive sharing, or every unit its own run (deepen)
                runs = runs_of(sharing_assignment("consecutive", units, loops) if share else tuple(range(units)))
                assert [u for run in runs for u in run] == list(range(units))
                assert all(len(run) <= (loops if share else 1) for run in runs)


def test_vit_blocks_are_wrapped_not_retyped_and_keep_their_parameter_names():
    from timm.models.vision_transformer import Block

    from vitblocks.models.families import LoopAwareBlock

    base = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    make_recursive(model, loops=2, groups=(4, 2))
    wrapped = model.blocks[0].block
    assert type(wrapped) is LoopAwareBlock and not isinstance(wrapped, Block) and type(base.blocks[0]) is Block
    assert {k.replace("blocks.0.block.", "blocks.0.") for k in model.state_dict() if k.startswith("blocks.0.")} == {
        k for k in base.state_dict() if k.startswith("blocks.0.")}


def test_plugged_sliced_variant_runs_compiled_regions_like_eager():
    model = timm.create_model("deit_tiny_rec_sliced_patch16_224", img_size=32, patch_size=8, embed_dim=16, depth=2,
                              num_heads=1, num_classes=3).eval()
    x = images(32, batch=2)
    with torch.no_grad():
        expected = model(x)
        vitblocks.compile_regions(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_timm_attn_mask_passes_through_recursion():
    model = timm.create_model("deit_tiny_rec_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    x, tokens = images(32, batch=2), 17
    with torch.no_grad():
        plain = model.forward_features(x)
        torch.testing.assert_close(model.forward_features(x, attn_mask=torch.ones(tokens, tokens, dtype=torch.bool)),
                                   plain)
        causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        assert not torch.allclose(model.forward_features(x, attn_mask=causal), plain)
    model.train().set_grad_checkpointing(False)
    for recursive in model.blocks:
        recursive.set_grad_checkpointing("loop")
    model.forward_features(x, attn_mask=causal).sum().backward()  # through checkpointed loops too
    sliced = timm.create_model("deit_tiny_rec_sliced_patch16_224", img_size=32, patch_size=8, depth=2).eval()
    with pytest.raises(ValueError, match="SlicedGroupAttention takes no attn_mask"):
        sliced.forward_features(x, attn_mask=causal)



def test_a_mask_for_a_wrapped_block_without_mask_arguments_is_refused_by_name():
    from timm.models.vision_transformer import Block

    from vitblocks.models.families import LoopAwareBlock

    class MaskFreeBlock(Block):
        def forward(self, x):
            return Block.forward(self, x)

    wrapped = LoopAwareBlock(MaskFreeBlock(dim=16, num_heads=2))
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(wrapped(x), Block.forward(wrapped, x))
    with pytest.raises(TypeError, match=r"MaskFreeBlock.forward takes no attn_mask or is_causal"):
        wrapped(x, attn_mask=torch.ones(5, 5, dtype=torch.bool))



def test_a_block_subclass_calling_super_runs_sliced_and_unsliced_like_timms_block():
    from timm.models.vision_transformer import Block, VisionTransformer

    class SuperBlock(Block):
        def forward(self, x, attn_mask=None, is_causal=False):
            assert isinstance(self, SuperBlock)
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

    options = dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=3)
    for groups in (None, (4, 2)):
        torch.manual_seed(0)
        plain = VisionTransformer(**options).eval()
        custom = VisionTransformer(**options, block_fn=SuperBlock).eval()
        custom.load_state_dict(plain.state_dict())
        for model in (plain, custom):
            make_recursive(model, loops=2, groups=groups)
        x = images(32, batch=2)
        with torch.no_grad():
            torch.testing.assert_close(custom(x), plain(x))


SMALL = {
    "deit": dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=1),
    "pit": dict(img_size=64),
    "swin": dict(img_size=32, patch_size=2, window_size=4, embed_dim=8, depths=(2, 2), num_heads=(1, 1)),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_trained_variants_reload_through_timms_weight_paths(name, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    from vitblocks.io import CheckpointError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: a local folder must not reach the hub
    kwargs = SMALL[name.split("_")[0]]
    model = timm.create_model(name, num_classes=3, **kwargs).eval()
    assert model.pretrained_cfg["architecture"] == model.default_cfg["architecture"] == name
    x = images(kwargs["img_size"], batch=2)
    expected = model(x)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    for file in ("w.pth", "w.safetensors"):
        again = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / file)),
                                  num_classes=3, **kwargs).eval()
        torch.testing.assert_close(again(x), expected)
    five = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")),
                             num_classes=5, **kwargs).eval()  # a new head; every other weight loaded
    torch.testing.assert_close(five.forward_features(x), model.forward_features(x))
    assert five(x).shape == (2, 5)
    for file in ("w.pth", "w.safetensors"):  # timm's checkpoint_path= loads after building, strictly
        loaded = timm.create_model(name, num_classes=3, checkpoint_path=str(tmp_path / file), **kwargs).eval()
        torch.testing.assert_close(loaded(x), expected)
    save_for_hf(model, str(tmp_path / "hf"), model_args=dict(num_classes=3, **kwargs))
    torch.testing.assert_close(timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()(x), expected)
    other = "swin_tiny_rec_patch4_window7_224" if not name.startswith("swin") else "deit_tiny_rec_patch16_224"
    with pytest.raises(CheckpointError, match="do not fit"):
        timm.create_model(other, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")),
                          num_classes=3, **SMALL[other.split("_")[0]])


def test_a_loop_view_is_the_blocks_class_seeing_the_wrapper_as_it_is_at_the_call():
    import pickle

    from timm.models.vision_transformer import Block

    from vitblocks.models.families import LoopAwareBlock, _loop_view, loop_view_class

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    make_recursive(model, loops=2)
    wrapper = next(m for m in model.modules() if isinstance(m, LoopAwareBlock))
    assert loop_view_class(Block) is loop_view_class(Block)
    bound = object()
    view = _loop_view(wrapper, bound)
    assert isinstance(view, Block) and view.attn is bound and view.norm1 is wrapper.norm1
    model.eval()
    assert view.training is False
    model.train()
    assert view.training is True
    x = torch.randn(2, 3, 32, 32)
    from vitblocks.models import families

    families._LOOP_VIEW_CLASSES.pop(Block)  # as in a new process, where no block was wrapped yet
    restored = pickle.loads(pickle.dumps(model)).eval()
    assert Block in families._LOOP_VIEW_CLASSES  # made on unpickling, before any trace
    torch.testing.assert_close(restored(x), model.eval()(x))
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # one graph: no break per block application
    torch.testing.assert_close(compiled(x), model(x))
