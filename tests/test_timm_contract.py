"""Every model vitblocks registers, held to what timm's own model tests check of a model.

The checks follow pytorch-image-models' `tests/test_models.py` (forward, backward with
a new class count, default cfg fields against the model, features, FX feature
extraction forward and backward, TorchScript) and add what deployment needs: a traced
TorchScript module saved and reloaded, and ONNX graphs from both exporters run in
onnxruntime. `torch.jit.script`, which torch 2.14 deprecates, is refused with one clear
error naming these paths (vitblocks' layers run Python control flow over blocks and
loops); timm's own test suite likewise leaves out models that cannot be scripted. They run
over `vitblocks.models.registered_models()`, so a model registered later is covered
without being listed here; no model is excluded.

The checks run at a small input where a model takes one (as timm shrinks the input of
such models): SReT at 64x64, the timm-based models at 128x128 where they build at it,
except where the check is about the default input size itself.
"""

from __future__ import annotations

import functools
import io
import warnings

import pytest
import timm
import torch
from timm.layers import set_scriptable
from timm.models import create_feature_extractor, get_graph_node_names

import vitblocks  # noqa: F401 - registers the models
from vitblocks.models import registered_models
from vitblocks.models.create import takes_img_size

MODELS = registered_models()


@functools.cache
def small_img_size(name: str) -> int | None:
    """The smaller input a model is checked at, or None for its default."""
    cfg = timm.models.get_pretrained_cfg(name)
    candidate = 64 if cfg.fixed_input_size is False else 128
    if not takes_img_size(name):
        return None
    try:
        with torch.no_grad():
            timm.create_model(name, img_size=candidate).eval()(torch.randn(1, 3, candidate, candidate))
    except (ValueError, AssertionError, RuntimeError):  # e.g. Swin's windows do not fit
        return None
    return candidate


def create(name: str, **kwargs) -> torch.nn.Module:
    """The model, built at its small input size (see `small_img_size`)."""
    torch.manual_seed(0)
    size = small_img_size(name)
    if size is not None:
        kwargs.setdefault("img_size", size)
    return timm.create_model(name, **kwargs)


def network_signature(name: str) -> tuple:
    """What a model computes at its check size: its class, parameter shapes and group
    schedules. Names that differ only in their default input size (SReT's *_384 / *_512)
    build the same network at the check size."""
    size = small_img_size(name)
    with torch.device("meta"):
        model = timm.create_model(name, **({} if size is None else {"img_size": size}))
    shapes = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    schedules = tuple(m.schedule.counts for m in model.modules() if getattr(m, "schedule", None) is not None)
    return type(model).__name__, shapes, schedules


def distinct_networks(names: list[str]) -> list[str]:
    """One name per network at the check size (the first, in order)."""
    seen: dict[tuple, str] = {}
    for name in names:
        seen.setdefault(network_signature(name), name)
    return list(seen.values())


# Checks that run at the small input size see the same network under every name of such
# a group, so they run once per network; the default-cfg check runs per name. The groups
# are listed rather than found at import, which would build every model whenever the
# suite is collected; the first test confirms the list (a name registered later is checked
# under its own name unless it is listed here).
SAME_NETWORK_AT_CHECK_SIZE = {
    "sret_t_unsliced_384": "sret_t_unsliced",
    "sret_s_unsliced_384": "sret_s_unsliced",
    "sret_s_unsliced_512": "sret_s_unsliced",
}
NETWORKS = [name for name in MODELS if name not in SAME_NETWORK_AT_CHECK_SIZE]


def test_each_network_is_checked_once_and_every_name_has_one():
    assert distinct_networks(MODELS) == NETWORKS, "update SAME_NETWORK_AT_CHECK_SIZE"
    for name, checked_as in SAME_NETWORK_AT_CHECK_SIZE.items():
        assert network_signature(name) == network_signature(checked_as)
    assert "sret_t" in NETWORKS  # same parameters as sret_t_unsliced, other group counts


def contract_input_size(model: torch.nn.Module) -> tuple[int, int, int]:
    """The input a check runs at: what the model was built for."""
    name = model.pretrained_cfg["architecture"]
    channels, height, width = model.pretrained_cfg["input_size"]
    size = small_img_size(name)
    return (channels, height, width) if size is None else (channels, size, size)


def feature_format(model: torch.nn.Module) -> str:
    """SReT's features are NCHW maps; the recursive timm models keep their base's layout
    (Swin: NHWC maps, ViT/DeiT and PiT: tokens)."""
    if hasattr(model, "output_fmt"):
        return getattr(model.output_fmt, "value", str(model.output_fmt))
    return "NCHW" if model.pretrained_cfg.get("pool_size") is not None and not hasattr(model, "blocks") else "NLC"


def channels_and_grid(features: torch.Tensor, fmt: str) -> tuple[int, tuple[int, ...]]:
    if fmt == "NCHW":
        return features.shape[1], tuple(features.shape[-2:])
    if fmt == "NHWC":
        return features.shape[-1], tuple(features.shape[1:3])
    return features.shape[-1], ()


def test_every_vitblocks_model_is_covered():
    assert {"sret_t", "sret_s", "deit_tiny_rec_sliced_patch16_224", "swin_tiny_rec_patch4_window7_224"} <= set(MODELS)
    assert "deit_tiny_patch16_224" not in MODELS and "sret_t_distill" not in MODELS  # timm's own, deprecated


@pytest.mark.parametrize("name", NETWORKS)
def test_forward_and_backward_with_a_new_class_count(name):
    model = create(name, num_classes=42).train()
    inputs = torch.randn(2, *contract_input_size(model))
    outputs = model(inputs)
    outputs.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert outputs.shape == (2, 42)
    assert not outputs.isnan().any()


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_default_cfg_matches_the_model(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert model.default_cfg == cfg
    state_dict = model.state_dict()
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "first_conv", "classifier"):
        assert key in cfg, f"{name}'s cfg has no {key}"
    assert cfg["num_classes"] == model.num_classes
    for conv in (cfg["first_conv"],) if isinstance(cfg["first_conv"], str) else cfg["first_conv"]:
        assert conv + ".weight" in state_dict
    assert cfg["classifier"] + ".weight" in state_dict

    inputs = torch.randn(1, *cfg["input_size"])  # the default size: pool_size is about it
    features = model.forward_features(inputs)
    fmt = feature_format(model)
    channels, grid = channels_and_grid(features, fmt)
    assert channels == model.num_features
    if fmt in ("NCHW", "NHWC"):
        assert grid == tuple(cfg["pool_size"])
    assert (model.forward_head(features, pre_logits=True).shape
            == (1, getattr(model, "head_hidden_size", model.num_features)))
    model.reset_classifier(0)
    assert model(inputs).shape == (1, model.num_features)
    if fmt in ("NCHW", "NHWC"):
        model.reset_classifier(0, "")  # no pooling: the unpooled map comes out
        assert channels_and_grid(model(inputs), fmt)[1] == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", NETWORKS)
@torch.no_grad()
def test_intermediates_and_features_only_follow_feature_info(name):
    model = create(name).eval()
    inputs = torch.randn(1, *contract_input_size(model))
    final, intermediates = model.forward_intermediates(inputs)
    torch.testing.assert_close(final, model.forward_features(inputs))
    features = create(name, features_only=True).eval()
    maps = features(inputs)
    fmt = features.output_fmt.value
    assert [channels_and_grid(m, fmt)[0] for m in maps] == features.feature_info.channels()
    if fmt != "NLC":
        assert [inputs.shape[-1] // channels_and_grid(m, fmt)[1][-1] for m in maps] == features.feature_info.reduction()
    assert len(intermediates) == len(model.feature_info)


def test_attn_mask_reaches_the_blocks_where_timm_passes_one():
    plain = create("deit_tiny_rec_patch16_224").eval()
    inputs = torch.randn(1, *contract_input_size(plain))
    tokens = plain.patch_embed.num_patches + plain.num_prefix_tokens
    everywhere = torch.ones(tokens, tokens, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(plain.forward_features(inputs, attn_mask=everywhere), plain.forward_features(inputs))
        sliced = create("deit_tiny_rec_sliced_patch16_224").eval()
        with pytest.raises(ValueError, match="takes no attn_mask"):
            sliced.forward_features(inputs, attn_mask=everywhere)


@pytest.mark.slow  # traces every network
@pytest.mark.parametrize("name", NETWORKS)
def test_fx_feature_extraction_forward_and_backward(name):
    model = create(name).eval()
    inputs = torch.randn(1, *contract_input_size(model))
    train_nodes, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, [eval_nodes[-1]])
    with torch.no_grad():
        (fx_out,) = extractor(inputs).values()
        torch.testing.assert_close(fx_out, model(inputs))
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(inputs), model(inputs))

    extractor = create_feature_extractor(model.train(), [train_nodes[-1]])
    (fx_out,) = extractor(torch.randn(2, *contract_input_size(model))).values()
    fx_out.mean().backward()
    missing = [n for n, p in extractor.named_parameters() if p.grad is None]
    assert not missing, f"no gradient through the FX graph for {missing}"


@pytest.mark.slow  # traces every network
@pytest.mark.parametrize("name", NETWORKS)
def test_torchscript_trace_matches_eager_and_reloads(name):
    model = create(name).eval()
    inputs = torch.randn(2, *contract_input_size(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice, the tracer's notes on constants
        traced = torch.jit.trace(model, inputs)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    reloaded = torch.jit.load(buffer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs), model(inputs), atol=1e-5, rtol=1e-5)


def test_torchscript_script_is_refused_naming_the_export_paths():
    """timm's own tests script its models; vitblocks' layers refuse it with one clear error instead
    (their forward is Python control flow over blocks and loops), naming what works."""
    with set_scriptable(True):
        model = create("sret_t").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script") as refused:
            torch.jit.script(model)
    assert all(path in str(refused.value) for path in ("torch.export", "AOTInductor", "torch.onnx.export",
                                                       "torch.jit.trace"))


def run_onnx(path: str, inputs: torch.Tensor):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0])


def architecture_key(name: str) -> tuple:
    """What decides a model's exported graph apart from sizes: its model class, the set
    of its module types, and whether its attention is sliced."""
    with torch.device("meta"):
        model = timm.create_model(name)
    sliced = any(getattr(m, "schedule", None) is not None and m.schedule.largest() > 1 for m in model.modules())
    return type(model).__name__, tuple(sorted({type(m).__name__ for m in model.modules()})), sliced


def parameter_count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def one_per_architecture(names: list[str]) -> list[str]:
    """The smallest model of each architecture."""
    chosen: dict[tuple, str] = {}
    for name in sorted(names, key=parameter_count):
        chosen.setdefault(architecture_key(name), name)
    return sorted(chosen.values())


# The dynamo exporter takes 15-45 s per model here; the registered names that share an
# architecture (same model class, module types and slicing) differ only in widths,
# depths, group counts and input size, which the TorchScript-based exporter checks for
# every network. Listed rather than found at import (see NETWORKS); the next test
# confirms the list is the smallest model of each architecture.
DYNAMO_MODELS = [
    "deit_tiny_mor_patch16_224", "deit_tiny_one_block_patch16_224",
    "deit_tiny_rec_sliced_patch16_224", "deit_tiny_shared_patch16_224", "pit_ti_rec_sliced_224",
    "pit_ti_shared_224", "sret_t", "sret_t_unsliced", "swin_tiny_shared_patch4_window7_224",
]
ONNX_CASES = [(name, "legacy") for name in NETWORKS] + [(name, "dynamo") for name in DYNAMO_MODELS]


def test_the_dynamo_export_covers_every_architecture():
    assert one_per_architecture(MODELS) == DYNAMO_MODELS, "update DYNAMO_MODELS"
    assert {"sret_t", "deit_tiny_rec_sliced_patch16_224", "pit_ti_rec_sliced_224"} <= set(DYNAMO_MODELS)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "exporter"), ONNX_CASES)
def test_onnx_export_runs_in_onnxruntime_with_a_dynamic_batch(name, exporter, tmp_path, record_property):
    """A dynamic-batch export, run at the export's batch size and at two others.

    The dynamo exporter runs without its graph optimizer here (`optimize=False`), which
    only tidies the graph and costs as much time again; docs/deploy.md's example runs it.
    """
    model = create(name).eval()
    example = torch.randn(2, *contract_input_size(model))
    path = str(tmp_path / f"{name}.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notices about their own internals
        if exporter == "dynamo":
            torch.onnx.export(model, (example,), path, dynamo=True, verbose=False, optimize=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    worst = 0.0
    for batch in (1, 2, 3):
        inputs = torch.randn(batch, *example.shape[1:])
        with torch.no_grad():
            expected = model(inputs)
        got = run_onnx(path, inputs)
        assert got.shape == expected.shape
        worst = max(worst, (got - expected).abs().max().item())
    record_property("onnx_max_abs_diff", worst)
    print(f"{name} {exporter}: max |onnxruntime - eager| = {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.slow
def test_onnx_dynamo_export_with_a_static_batch(tmp_path):
    model = create("sret_t_unsliced").eval()
    example = torch.randn(1, *contract_input_size(model))
    path = str(tmp_path / "static.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, dynamo=True, verbose=False, optimize=False)
    with torch.no_grad():
        expected = model(example)
    got = run_onnx(path, example)
    assert got.shape == expected.shape and (got - expected).abs().max().item() < 1e-4
