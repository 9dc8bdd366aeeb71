"""Comparing a module's training step with and without activation checkpointing."""

import torch


def assert_checkpointing_changes_nothing(module, x, seed=1, atol=1e-6):
    """One forward/backward plain, one with `set_grad_checkpointing(True)`, from the same random state.

    Outputs must be equal and gradients equal within `atol` (recomputation reorders no
    arithmetic, but the backward may accumulate in another order).
    """
    module.train()  # later loops draw random permutations in training: the same seed for both passes
    runs = []
    for checkpointing in (False, True):
        module.zero_grad()
        module.set_grad_checkpointing(checkpointing)
        torch.manual_seed(seed)
        out = module(x)
        out.sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = runs
    assert torch.equal(plain, checkpointed)
    assert plain_grads.keys() == checkpointed_grads.keys() and plain_grads
    assert all(torch.allclose(plain_grads[n], checkpointed_grads[n], atol=atol) for n in plain_grads)
