"""Token routing (`TokenRouting`): exact at full capacity, equal to a dense masked reference, and cheaper."""

import pytest
import torch
from timm.models.vision_transformer import Block
from torch.utils.flop_counter import FlopCounterMode

from vitblocks.layers import Recursive, TokenRouting, TransformerBlock, routing_capacities

DIM = 16


def timm_block() -> Block:
    torch.manual_seed(0)
    return Block(DIM, num_heads=2, mlp_ratio=2.0).double().eval()


def routed(block, loops=3, capacity=0.5, pinned=1) -> TokenRouting:
    routing = TokenRouting(block, DIM, loops=loops, capacity=capacity, pinned=pinned).double()
    torch.manual_seed(1)
    for router in routing.routers.values():  # scores that differ clearly between tokens
        torch.nn.init.normal_(router.weight)
        torch.nn.init.normal_(router.bias)
    return routing


def dense_masked_reference(routing: TokenRouting, x: torch.Tensor, loop: int) -> torch.Tensor:
    """The same application computed on every token: attention keys masked to the chosen tokens,
    updates kept only at chosen places. No gather, no scatter."""
    pinned, (batch, num_tokens, _) = routing.pinned, x.shape
    scores = routing.routers[str(loop)](x[:, pinned:]).squeeze(-1)
    k = routing.tokens_updated(num_tokens, loop) - pinned
    threshold = scores.topk(k, dim=1).values[:, -1:]
    chosen = torch.cat([torch.ones(batch, pinned, dtype=torch.bool), scores >= threshold], dim=1)
    weight = torch.cat([torch.ones(batch, pinned, dtype=x.dtype), torch.sigmoid(scores)], dim=1)
    keys = chosen[:, None, None, :].expand(batch, 1, num_tokens, num_tokens)
    update = routing.block(x, attn_mask=keys) - x
    return torch.where(chosen[..., None], x + weight[..., None] * update, x)


def test_every_capacity_at_one_is_exactly_the_static_block():
    block = TransformerBlock(dim=DIM, num_heads=2, mlp_ratio=2.0, groups=(4, 2, 1)).eval()
    full = TokenRouting(block, DIM, loops=3, capacity=(1.0, 1.0, 1.0))
    x = torch.randn(2, 16, DIM)
    with torch.no_grad():
        assert torch.equal(Recursive(full, loops=3)(x), Recursive(block, loops=3)(x))


@pytest.mark.parametrize("pinned", [0, 1])
def test_routed_loops_equal_a_dense_masked_reference_forward_and_backward(pinned):
    routing = routed(timm_block(), pinned=pinned)
    x = torch.randn(3, 13, DIM, dtype=torch.float64, requires_grad=True)
    params = list(routing.parameters())
    for loop in (1, 2):
        got = routing(x, loop=loop)
        expected = dense_masked_reference(routing, x, loop)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        grads = torch.autograd.grad(got.square().sum(), [x, *params], allow_unused=True)
        reference = torch.autograd.grad(expected.square().sum(), [x, *params], allow_unused=True)
        for a, b in zip(grads, reference):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        router_grad = grads[1 + next(i for i, p in enumerate(params) if p is routing.routers[str(loop)].weight)]
        assert router_grad.abs().sum() > 0


def test_a_routed_loop_updates_k_tokens_and_leaves_the_rest_untouched_and_the_router_learns():
    routing = routed(timm_block(), capacity=0.25, pinned=1)
    x = torch.randn(2, 17, DIM, dtype=torch.float64)
    out = routing(x, loop=1)
    changed = (out != x).any(-1)
    assert changed[:, 0].all()  # the pinned class token is always updated
    assert changed.sum(1).tolist() == [1 + 4, 1 + 4]  # and ceil(0.25 * 16) others
    out.sum().backward()
    assert routing.routers["1"].weight.grad.abs().sum() > 0  # the update's weight carries the loss to the router
    assert routing.routers["2"].weight.grad is None  # another loop's router took no part
    assert "0" not in routing.routers  # the full first loop has no router: it would get no gradient


def test_skipped_tokens_cost_nothing():
    block = TransformerBlock(dim=64, num_heads=2, groups=1, backend="math").eval()  # attention counted too
    x = torch.randn(4, 64, 64)

    def flops(module):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(x)
        return counter.get_total_flops()

    static, half = flops(Recursive(block, loops=4)), flops(Recursive(TokenRouting(block, 64, loops=4), loops=4))
    # loop 0 on all 64 tokens, loops 1-3 on 32: (1 + 3 / 2) / 4 of the linear work, less of the attention's
    assert 0.5 < half / static < 0.625, half / static


def routed_stack() -> Recursive:
    from vitblocks.layers import NonLinearMix

    routing = routed(TransformerBlock(dim=DIM, num_heads=2, mlp_ratio=2.0, groups=(4, 1, 1)), capacity=(1.0, 0.5, 0.25))
    torch.manual_seed(3)
    return Recursive(routing.float(), loops=3, mix=lambda: NonLinearMix(DIM)).eval()


def test_expert_choice_routing_exports_with_static_shapes():
    model, x = routed_stack(), torch.randn(2, 17, DIM)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
        assert not torch.equal(expected, model.block.block(x))  # the routers chose: not a plain pass


@pytest.mark.slow  # compiles
def test_expert_choice_routing_compiles_to_one_graph():
    model, x = routed_stack(), torch.randn(2, 17, DIM)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-5, rtol=1e-5)


def test_routing_under_bf16_autocast_scores_in_float32_and_keeps_the_dtype():
    model, x = routed_stack(), torch.randn(2, 17, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(x)
    assert out.dtype == torch.float32 and out.isfinite().all()


def test_stochastic_depth_masks_are_drawn_once_per_forward_and_reach_the_block(monkeypatch):
    block = TransformerBlock(dim=DIM, num_heads=2, mlp_ratio=2.0, groups=1, residual_scalars=True, drop_path=0.5)
    stack = Recursive(TokenRouting(block, DIM, loops=3), loops=3).train()
    draws, handed = [], []
    real_draw, real_forward = block.draw_drop_masks, block.forward
    monkeypatch.setattr(block, "draw_drop_masks", lambda x, loops: draws.append(loops) or real_draw(x, loops))
    monkeypatch.setattr(block, "forward", lambda x, loop=0, **kw: handed.append(kw.get("drop_masks") is not None)
                        or real_forward(x, loop=loop, **kw))
    stack(torch.randn(2, 16, DIM))
    assert draws == [3] and handed == [True, True, True]


@pytest.mark.parametrize("kwargs, message", [
    (dict(capacity=0.0), r"capacity must be in \(0, 1\]"),
    (dict(capacity=1.5), r"capacity must be in \(0, 1\]"),
    (dict(capacity=(1.0, 0.5)), "gives 2 loops' capacities for loops=3"),
    (dict(pinned=-1), "pinned must be an int >= 0"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenRouting(torch.nn.Identity(), DIM, loops=3, **kwargs)


def test_sliced_attention_on_a_routed_loop_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="loop 1 is routed .* slices its tokens into 2 groups there: groups follow"):
        TokenRouting(TransformerBlock(dim=DIM, num_heads=2, groups=(4, 2)), DIM, loops=2)
    TokenRouting(TransformerBlock(dim=DIM, num_heads=2, groups=(4, 1)), DIM, loops=2)  # sliced only where unrouted


def test_test_time_depth_reuses_the_last_router_beyond_the_trained_loops():
    from vitblocks.layers import set_loops

    routing = routed(timm_block(), loops=2, capacity=0.25, pinned=0)
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(routing(x, loop=5), routing(x, loop=1), atol=0, rtol=0)
        stack = Recursive(routing, loops=2).eval()
        set_loops(stack, 4)
        deeper = stack(x)
        expected = x
        for loop in range(4):
            expected = routing(expected, loop=loop)
        torch.testing.assert_close(deeper, expected, atol=0, rtol=0)
    assert routing_capacities(0.25, 2) == (1.0, 0.25)
    with pytest.raises(ValueError, match="loop must be >= 0"):
        routing(x, loop=-1)


SMALL_DEIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3)


@pytest.mark.parametrize("share", [False, True, "cycle"])
def test_make_recursive_routes_deit_and_loads_the_base_weights_under_the_routers(share):
    import timm

    from vitblocks.models.plug import load_base_weights, make_recursive, recursion_plan_of

    base = timm.create_model("deit_tiny_patch16_224", **SMALL_DEIT).eval()
    plain, full, half = (timm.create_model("deit_tiny_patch16_224", **SMALL_DEIT).eval() for _ in range(3))
    load_base_weights(plain, base.state_dict(), make_recursive(plain, loops=2, share=share))
    plan = make_recursive(full, loops=2, share=share, routing={"capacity": 1.0})
    assert not load_base_weights(full, base.state_dict(), plan).new  # no loop routes: no router, all weights found
    plan = make_recursive(half, loops=2, share=share, routing={"capacity": 0.5})
    report = load_base_weights(half, base.state_dict(), plan)
    assert report.new and all(".routers.1." in key for key in report.new)  # the routers are all that is new
    assert recursion_plan_of(half, base.state_dict()) == plan
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(full(x), plain(x))  # capacity 1.0: the unrouted model exactly
        assert half(x).shape == (2, 3) and not torch.equal(half(x), plain(x))


def test_pit_stages_route_with_their_class_token_pinned():
    import timm

    from vitblocks.models.plug import make_recursive

    model = timm.create_model("pit_ti_224", img_size=64, num_classes=3)
    make_recursive(model, loops=2, routing={"capacity": 0.5})
    routers = [m for m in model.modules() if isinstance(m, TokenRouting)]
    assert routers and {m.pinned for m in routers} == {1}
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(m.routers["1"].weight.grad is not None for m in routers)


@pytest.mark.parametrize("name, kwargs, message", [
    ("swin_tiny_patch4_window7_224", dict(routing={"capacity": 0.5}), "Swin blocks .* need every token"),
    ("deit_tiny_patch16_224", dict(routing={"capacity": 0.5}, relax={"rank": 2}), "routing and relax together"),
    ("deit_tiny_patch16_224", dict(routing={"capcity": 0.5}),
     r"unknown option\(s\) capcity \(options: capacity, mode, balance\)"),
    ("deit_tiny_patch16_224", dict(routing={"capacity": 0.5}, groups=(2, 2)), "loop 1 is routed .* 2 groups there"),
])
def test_routing_requests_make_recursive_cannot_honour_are_refused(name, kwargs, message):
    import timm

    from vitblocks.models.plug import make_recursive

    with pytest.raises(ValueError, match=message):
        make_recursive(timm.create_model(name, pretrained=False), loops=2, **kwargs)


def test_relaxing_a_routed_block_is_refused():
    from vitblocks.layers import relax_recursion

    stack = Recursive(TokenRouting(TransformerBlock(dim=DIM, num_heads=2), DIM, loops=2), loops=2)
    with pytest.raises(ValueError, match="routes its tokens .* relaxing a routed block is not supported yet"):
        relax_recursion(stack, {"rank": 2})


def test_a_refused_routing_leaves_the_model_as_it_was():
    import timm

    from vitblocks.models.plug import make_recursive

    model = timm.create_model("pit_ti_224", img_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"transformers.1.blocks: loop 1 is routed"):
        make_recursive(model, loops=2, routing={"capacity": 0.5}, groups=((1, 1), (4, 2), (1, 1)))
    assert not any(isinstance(m, (Recursive, TokenRouting)) for m in model.modules())
    assert model.state_dict().keys() == before.keys()


def test_sret_takes_routing_and_is_exactly_sret_at_full_capacity():
    import re

    import timm

    plain = timm.create_model("sret_t", img_size=64).eval()
    full = timm.create_model("sret_t", img_size=64, routing={"capacity": 1.0}).eval()
    moved = {re.sub(r"(stages\.\d+\.blocks\.\d+\.block\.)", r"\1block.", k): v for k, v in plain.state_dict().items()}
    result = full.load_state_dict(moved, strict=False)
    assert not result.unexpected_keys and all(".routers." in key for key in result.missing_keys)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(full(x), plain(x))
    half = timm.create_model("sret_t", img_size=64, routing={"capacity": 0.5}, groups=((8, 1), (4, 1), (1, 1)))
    half(x).sum().backward()
    assert all(m.routers["1"].weight.grad is not None for m in half.modules() if isinstance(m, TokenRouting))


@pytest.mark.parametrize("kwargs, message", [
    (dict(routing={"capacity": 0.5}), r"loop 1 is routed .* \(groups=\(8, 1\)\)"),
    (dict(routing={"depth": 2}), r"unknown option\(s\) depth"),
    (dict(routing=0.5), "routing must be a dict"),
])
def test_sret_routing_requests_it_cannot_honour_are_refused(kwargs, message):
    import timm

    with pytest.raises(ValueError, match=message):
        timm.create_model("sret_t", img_size=64, **kwargs)


@pytest.mark.slow  # trains
def test_a_routed_sret_trains_with_ema_resumes_and_its_run_folder_rebuilds_it(tmp_path):
    import dataclasses

    import timm

    from train_helpers import tiny_config
    from vitblocks.train import ModelConfig, Trainer

    kwargs = dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1), groups=((4, 1), (1,), (1,)),
                  mlp_ratio=2.0, routing={"capacity": 0.5})
    config = tiny_config(tmp_path, epochs=1, ema_decay=0.9, model=ModelConfig("sret_t", kwargs=kwargs))
    Trainer(config).fit(progress=False)
    resumed = Trainer(dataclasses.replace(config, epochs=2))
    resumed.resume(tmp_path / "last.pth")
    resumed.fit(progress=False)
    assert resumed.state.epoch == 2
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert any(isinstance(m, TokenRouting) for m in rebuilt.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), resumed.model.eval()(x))


def test_a_token_that_skips_a_loop_skips_its_mix_layer_too():
    from vitblocks.layers import NonLinearMix

    routing = routed(timm_block(), capacity=0.25, pinned=0)
    torch.manual_seed(2)
    stack = Recursive(routing, loops=3, mix=lambda: NonLinearMix(DIM).double()).eval()
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    with torch.no_grad():
        after_first = stack.mix_at(0)(routing.block(x))
        out = stack(x)
        second = routing(after_first, loop=1, mix=stack.mix_at(1))
    unchanged = (second == after_first).all(-1)
    assert unchanged.sum(1).tolist() == [12, 12]  # 16 - ceil(0.25 * 16): neither block nor mix touched them
    expected = routing(second, loop=2, mix=stack.mix_at(2))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_the_official_layout_refuses_a_routed_sret_by_name():
    import timm

    from vitblocks.io import CheckpointError
    from vitblocks.models.official import export_official_state_dict

    model = timm.create_model("sret_t", img_size=64, routing={"capacity": 0.5}, groups=((8, 1), (4, 1), (1, 1)))
    with pytest.raises(CheckpointError, match="the official layout has no token routing"):
        export_official_state_dict(model)


def test_beyond_the_trained_loops_the_block_is_told_the_loop_as_it_is():
    seen = []

    class LoopRecorder(torch.nn.Module):
        loop_aware = True

        def forward(self, x, loop=0):
            seen.append(loop)
            return 2 * x

    routing = TokenRouting(LoopRecorder(), DIM, loops=2, capacity=0.5)
    routing(torch.randn(1, 8, DIM), loop=5)  # router and capacity of loop 1, the block's own loop 5
    assert seen == [5]


@pytest.mark.parametrize("name, kwargs", [
    ("sret_t", dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1), mlp_ratio=2.0,
                    groups=((4, 1), (1,), (1,)), img_size=32, num_classes=4)),
    ("deit_tiny_rec_patch16_224", dict(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4)),
])
def test_a_routed_model_starts_from_a_static_ones_weights_through_timm(name, kwargs, tmp_path):
    import timm

    static = timm.create_model(name, **kwargs).eval()
    torch.save(static.state_dict(), tmp_path / "static.pth")
    routed = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "static.pth")),
                               routing={"capacity": 1.0, "mode": "token"} if name == "sret_t" else {"capacity": 0.5},
                               **kwargs).eval()
    held = {k.replace(".block.block.", ".block."): v for k, v in routed.state_dict().items() if ".routers." not in k}
    assert held.keys() == static.state_dict().keys()
    # every trained weight in place (timm starts a head afresh for a class count other than its cfg's 1000)
    assert all(torch.equal(v, static.state_dict()[k]) for k, v in held.items() if not k.startswith("head."))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert routed(x).shape == (2, 4)
