"""Token-choice routing: each token's depth from one decision, a balancing loss the trainer adds, static shapes."""

import copy

import pytest
import torch
from timm.models.vision_transformer import Block

from vitblocks.layers import NonLinearMix, Recursive, TokenRouting, TransformerBlock, auxiliary_loss

DIM = 16


def by_token(block=None, loops=3, capacity=None, pinned=1, balance=0.01) -> TokenRouting:
    if block is None:
        torch.manual_seed(0)
        block = Block(DIM, num_heads=2, mlp_ratio=2.0).double().eval()
    routing = TokenRouting(block, DIM, loops=loops, capacity=capacity, mode="token", pinned=pinned,
                           balance=balance).double()
    torch.manual_seed(1)
    torch.nn.init.normal_(routing.routers["depth"].weight)  # depths that differ clearly between tokens
    return routing


def gathered_and_updated(routing: TokenRouting, depth, gate, loop: int, num_tokens: int):
    """Per image, in plain Python: the tokens each loop gathers and updates. A loop takes the tokens the
    previous loop updated whose depth reaches it, most probable first, up to its capacity, and fills any
    places left with the most probable others (gathered, not updated)."""
    gathered, updated = [], []
    for image in range(depth.shape[0]):
        going_on = set(range(depth.shape[1]))
        for step in range(1, loop + 1):
            k = routing.tokens_updated(num_tokens, step) - routing.pinned
            by_gate = sorted(range(depth.shape[1]), key=lambda t: -gate[image, t].item())
            reaching = [t for t in by_gate if t in going_on and depth[image, t] >= min(step, routing.loops - 1)]
            taken = (reaching + [t for t in by_gate if t not in reaching])[:k]
            going_on = set(taken) & set(reaching)
        gathered.append(set(taken))
        updated.append(going_on)
    return gathered, updated


def dense_masked_reference(routing: TokenRouting, x: torch.Tensor, loop: int, depth_input: torch.Tensor):
    """One token-choice application on every token, no gather: attention keys masked to the tokens the
    loop gathers, updates kept where it updates them."""
    pinned, (batch, num_tokens, _) = routing.pinned, x.shape
    probs = routing.routers["depth"](depth_input[:, pinned:]).softmax(-1)
    gate, depth = probs.max(-1)
    gathered, updated = gathered_and_updated(routing, depth, gate, loop, num_tokens)
    rows = torch.arange(num_tokens - pinned)
    gathered = torch.stack([torch.isin(rows, torch.tensor(sorted(g))) for g in gathered])
    updated = torch.stack([torch.isin(rows, torch.tensor(sorted(u), dtype=torch.long)) for u in updated])
    ones = torch.ones(batch, pinned, dtype=torch.bool)
    keys = torch.cat([ones, gathered], 1)[:, None, None, :].expand(batch, 1, num_tokens, num_tokens)
    weight = torch.cat([torch.ones(batch, pinned, dtype=x.dtype), gate], 1)
    out = x + weight[..., None] * (routing.block(x, attn_mask=keys) - x)
    return torch.where(torch.cat([ones, updated], 1)[..., None], out, x)


@pytest.mark.parametrize("capacity", [None, 0.25])  # places for the tokens reaching a loop, and too few
def test_token_choice_equals_a_dense_masked_reference_forward_and_backward(capacity):
    routing = by_token(capacity=capacity)
    stack_input = torch.randn(3, 13, DIM, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 13, DIM, dtype=torch.float64, requires_grad=True)
    params = list(routing.parameters())
    for loop in (1, 2, 4):  # 4: test-time depth
        draw = routing.draw_drop_masks(stack_input, loops=loop + 1)[loop]
        got = routing(x, loop=loop, drop_masks=draw)
        expected = dense_masked_reference(routing, x, loop, stack_input)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        grads = torch.autograd.grad(got.square().sum(), [x, stack_input, *params], allow_unused=True)
        reference = torch.autograd.grad(expected.square().sum(), [x, stack_input, *params], allow_unused=True)
        for a, b in zip(grads, reference):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        router = next(i for i, p in enumerate(params) if p is routing.routers["depth"].weight)
        assert grads[2 + router].abs().sum() > 0  # the router learns


def test_each_token_takes_the_loops_its_depth_gives_and_skips_their_mix_layers():
    routing = by_token(TransformerBlock(dim=DIM, num_heads=2, mlp_ratio=2.0).double(), capacity=1.0)
    stack = Recursive(routing, loops=3, mix=lambda: NonLinearMix(DIM)).double().eval()
    x = torch.randn(2, 17, DIM, dtype=torch.float64)
    depth = routing.choose_depths(x).depth
    assert len(set(depth.flatten().tolist())) == 3  # the router gives all three depths
    # per loop: the tokens whose depth reaches it change (class token always), the others come out as they went in
    out = x
    draws = routing.draw_drop_masks(x, 3)
    with torch.no_grad():
        for loop in range(3):
            before, out = out, routing(out, loop=loop, mix=stack.mix_at(loop), drop_masks=draws[loop])
            changed = (out != before).any(-1)
            expected = torch.cat([torch.ones(2, 1, dtype=torch.bool), depth >= loop], 1)
            assert torch.equal(changed, expected), loop


def test_the_balancing_loss_is_handed_out_once_and_evens_out_the_depths():
    routing = by_token(TransformerBlock(dim=DIM, num_heads=2).double(), balance=1.0)
    with torch.no_grad():
        routing.routers["depth"].bias.copy_(torch.tensor([2.0, 0.0, 0.0]))  # nearly every token stops after loop 0
    routing.routers["depth"].weight.data.normal_(std=0.1)
    x = torch.randn(8, 17, DIM, dtype=torch.float64)
    optimizer = torch.optim.SGD(routing.routers.parameters(), lr=5.0)
    shares = []
    for _ in range(30):
        routing.train()
        choice = routing.choose_depths(x)
        shares.append((choice.depth == 0).double().mean().item())
        loss = auxiliary_loss(routing)
        assert loss is not None and auxiliary_loss(routing) is None  # taken once
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert shares[0] == 1.0 and shares[-1] < 0.6, shares
    with torch.no_grad():
        routing.choose_depths(x)
    assert auxiliary_loss(routing) is None  # none without gradients (evaluation)
    routing.choose_depths(x)  # a loss left untaken: a copy of the model (EMA) leaves it behind
    assert copy.deepcopy(routing).pending_loss == [] and len(routing.pending_loss) == 1


def test_the_trainer_adds_the_balancing_loss(tmp_path, monkeypatch):
    from train_helpers import tiny_config
    from vitblocks.train import ModelConfig, Trainer

    taken = []
    import vitblocks.train.run.engine as engine

    def recording(model):
        loss = auxiliary_loss(model)
        taken.append(loss)
        return loss

    monkeypatch.setattr(engine, "auxiliary_loss", recording)
    kwargs = dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, patch_size=8,
                  routing={"mode": "token", "balance": 0.5})
    config = tiny_config(tmp_path, epochs=1, model=ModelConfig("deit_tiny_rec_patch16_224", kwargs=kwargs))
    Trainer(config).fit(progress=False)
    assert taken and all(loss is not None and loss.requires_grad for loss in taken)


def test_token_choice_exports_with_static_shapes():
    routing = by_token(TransformerBlock(dim=DIM, num_heads=2, mlp_ratio=2.0, groups=(4, 1, 1)).double())
    model, x = Recursive(routing.float(), loops=3, mix=lambda: NonLinearMix(DIM)).eval(), torch.randn(2, 17, DIM)
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), expected)
        torch.testing.assert_close(exported.module()(x * 2), model(x * 2))  # other depths, same graph


def test_test_time_depth_takes_the_deepest_tokens_on():
    routing = by_token(TransformerBlock(dim=DIM, num_heads=2, mlp_ratio=2.0).double(), capacity=1.0)
    x = torch.randn(2, 17, DIM, dtype=torch.float64)
    depth = routing.choose_depths(x).depth
    with torch.no_grad():
        out = routing(x, loop=5)
    changed = (out != x).any(-1)[:, 1:]
    assert torch.equal(changed, depth == 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="tokens"), "routing mode must be one of 'expert', 'token'"),
    (dict(mode="token", balance=-1), "balance must be a number >= 0"),
    (dict(mode="token", capacity=(1.0, 0.5)), "gives 2 loops' capacities for loops=3"),
    (dict(mode="token", capacity=(0.5, 0.5, 0.5)), "every token takes the first loop, so its capacity must be 1.0"),
])
def test_bad_token_choice_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenRouting(TransformerBlock(dim=DIM, num_heads=2), DIM, loops=3, **kwargs)


def test_token_choice_plugs_into_sret_and_deit():
    import timm

    import vitblocks  # noqa: F401 (registers the models)

    sret = timm.create_model("sret_t", embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1),
                             groups=((4, 1), (1,), (1,)), mlp_ratio=2.0, img_size=32, num_classes=4,
                             routing={"mode": "token"})
    routers = [m for m in sret.modules() if isinstance(m, TokenRouting)]
    assert routers and all(r.mode == "token" for r in routers)
    assert sret(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert auxiliary_loss(sret) is not None  # training mode, gradients on: the balancing loss is kept
