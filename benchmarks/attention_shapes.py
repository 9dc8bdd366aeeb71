"""Grouped attention alone, per backend, at the shapes SReT-T gives it.

These rows are what the `auto` backend rule is read from: each SReT-T attention call
(stage, loop) timed with every backend that can run it, forward only (infer) or forward
and backward (train), at the run's batch size, in images per second.
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks.measure import time_interleaved
from benchmarks.result import Result
from vitblocks.attention import available_backends, group_attention


def sret_t_attention_shapes(img_size: int) -> list[tuple[int, int, int, int]]:
    """(tokens, groups, heads, head_dim) of each distinct SReT-T attention call.

    Args:
        img_size: Square input size; the stem has stride 8 and each stage halves it.

    Returns:
        One tuple per (stage, loop) with a distinct shape.
    """
    side, shapes = img_size // 8, []
    for heads, schedule in ((2, (8, 2)), (4, (4, 1)), (8, (1,))):
        for groups in schedule:
            if groups <= side * side and (side * side, groups, heads, 32) not in shapes:
                shapes.append((side * side, groups, heads, 32))
        side = (side + 1) // 2
    return shapes


def measure_attention_shapes(batch: int, img_size: int, device: torch.device, dtype: torch.dtype, train: bool,
                             args) -> list[Result]:
    """Time `group_attention` with each available backend at SReT-T's shapes.

    Args:
        batch: Images per call.
        img_size: SReT-T input size the shapes follow.
        device: Where to run.
        dtype: Input dtype.
        train: Forward and backward (True) or forward under no_grad.
        args: The run's settings (warmup, repeats).

    Returns:
        Rows of group "attention", named by shape.
    """
    rows = []
    for tokens, groups, heads, head_dim in sret_t_attention_shapes(img_size):
        qkv = torch.randn(3, batch, tokens, heads, head_dim, device=device, dtype=dtype).unbind(0)
        grad = torch.randn_like(qkv[0])
        fns = {}
        for backend in available_backends(device, dtype):
            fns[backend] = _call(qkv, groups, backend, grad if train else None)
        timings = time_interleaved(fns, device, args.warmup, args.repeats)
        name = f"attention N={tokens} groups={groups} heads={heads} head_dim={head_dim}"
        rows += [Result("attention", name, backend, "train" if train else "infer", batch / t.median,
                        100 * t.iqr / t.median, 0.0) for backend, t in timings.items()]
    return rows


def _call(qkv, groups, backend, grad):
    def run():
        inputs = [t.detach().requires_grad_(grad is not None) for t in qkv]
        with torch.no_grad() if grad is None else contextlib.nullcontext():
            out = group_attention(*inputs, groups, backend=backend)
        if grad is not None:
            out.backward(grad)
    return run
