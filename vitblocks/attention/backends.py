"""Attention kernels behind `group_attention`.

Every backend takes queries, keys and values in token-major layout (B, N, H, D) — the
layout a fused qkv projection produces without any copy — and says, before it runs,
why it cannot take an input (`unsupported_reasons`), in the spirit of xformers'
operator dispatcher.

Grouped attention is reduced to plain attention without any N x N mask: near-equal
groups form at most two runs of equal-size groups (see `TokenGroups.runs`), and each
run is folded into the batch dimension. Prefix tokens are handled by one extra call for
their queries (they see every key) and by prepending their keys and values to every
group.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F

from vitblocks.attention.groups import GroupRun, TokenGroups

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fold(x: torch.Tensor, run: GroupRun) -> torch.Tensor:
    """(B, N, H, D) patch tokens -> (B * count, size, H, D) for one run of groups."""
    b, _, h, d = x.shape
    return x[:, run.start : run.stop].reshape(b * run.count, run.size, h, d)


def _with_prefix(groups_kv: torch.Tensor, prefix_kv: torch.Tensor, count: int) -> torch.Tensor:
    """Prepend the prefix keys (or values) of each sample to each of its `count` groups."""
    b, p, h, d = prefix_kv.shape
    prefix = prefix_kv.unsqueeze(1).expand(b, count, p, h, d).reshape(b * count, p, h, d)
    return torch.cat([prefix, groups_kv], dim=1)


def _folded_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: TokenGroups
) -> Iterator[tuple[GroupRun, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each run of equal groups: its patch queries folded into the batch dimension,
    and its keys and values with the prefix tokens' keys and values prepended."""
    p = groups.num_prefix_tokens
    for run in groups.runs:
        qg, kg, vg = (_fold(t[:, p:], run) for t in (q, k, v))
        if p:
            kg = _with_prefix(kg, k[:, :p], run.count)
            vg = _with_prefix(vg, v[:, :p], run.count)
        yield run, qg, kg, vg


class AttentionBackend:
    """One attention kernel.

    Subclasses implement `attend` (unmasked attention) and `unsupported_reasons`;
    `attend_groups` turns grouped attention into `attend` calls and may be overridden
    by a kernel that has a cheaper way.
    """

    name: str = ""

    def unsupported_reasons(self, q: torch.Tensor, dropout_p: float) -> list[str]:
        """Why this backend cannot run an input like `q`; empty when it can.

        Args:
            q: Queries of shape (B, N, H, D).
            dropout_p: Attention dropout probability that will be applied.

        Returns:
            Human-readable reasons, one per problem.
        """
        reasons = []
        if q.dtype not in _FLOAT_DTYPES:
            reasons.append(f"dtype {q.dtype} is not a floating-point type")
        return reasons

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float
    ) -> torch.Tensor:
        """Unmasked multi-head attention.

        Args:
            q: Queries (B, Nq, H, D).
            k: Keys (B, Nk, H, D).
            v: Values (B, Nk, H, D).
            scale: Factor applied to the query-key products.
            dropout_p: Dropout probability on the attention weights.

        Returns:
            Output of shape (B, Nq, H, D).
        """
        raise NotImplementedError

    def attend_groups(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        groups: TokenGroups,
        scale: float,
        dropout_p: float,
    ) -> torch.Tensor:
        """Attention restricted to token groups (see `TokenGroups` for the rule).

        Args:
            q: Queries (B, P + N, H, D), prefix tokens first.
            k: Keys, same shape as `q`.
            v: Values, same shape as `q`.
            groups: The partition of the N patch tokens.
            scale: Factor applied to the query-key products.
            dropout_p: Dropout probability on the attention weights.

        Returns:
            Output of shape (B, P + N, H, D).
        """
        if groups.num_groups == 1:
            return self.attend(q, k, v, scale, dropout_p)
        p = groups.num_prefix_tokens
        outputs = [self.attend(q[:, :p], k, v, scale, dropout_p)] if p else []
        for run, qg, kg, vg in _folded_runs(q, k, v, groups):
            out = self.attend(qg, kg, vg, scale, dropout_p)
            outputs.append(out.reshape(q.shape[0], run.count * run.size, *out.shape[2:]))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class MathBackend(AttentionBackend):
    """Explicit matmul-softmax: the reference, and the kernel FLOP counters can see."""

    name = "math"

    def attend(self, q, k, v, scale, dropout_p):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # softmax accumulates in float32 for half inputs on its own; asking for a float32
        # result instead would keep a float32 copy of the weights for backward.
        weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        return (weights @ v).transpose(1, 2)


class SdpaBackend(AttentionBackend):
    """PyTorch's `scaled_dot_product_attention` (flash / memory-efficient / math)."""

    name = "sdpa"

    def attend(self, q, k, v, scale, dropout_p):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        return out.transpose(1, 2)


# find_spec does not import: importing xformers where it cannot run prints warnings.
XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


@functools.lru_cache(maxsize=None)
def _import_xformers_ops() -> ModuleType:
    import xformers.ops

    return xformers.ops


_XFORMERS_PROBES: dict[tuple[str, torch.dtype, int], str | None] = {}


@torch.compiler.assume_constant_result  # torch.compile runs it for real while tracing: no graph break
def xformers_kernel_problem(device: str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why xformers' kernels cannot run attention of this kind here, or None if they can.

    An installed xformers may still lack kernels for this GPU, this torch build or this
    head size (a wheel built for another torch raises at its first call). One tiny
    attention call per (device, dtype, head size) finds out, once per process.

    Args:
        device: A CUDA device, e.g. "cuda:0".
        dtype: Tensor dtype.
        head_dim: Channels per head.

    Returns:
        A one-line reason, or None.
    """
    key = (device, dtype, head_dim)
    if key not in _XFORMERS_PROBES:
        try:
            probe = torch.randn(1, 8, 1, head_dim, device=device, dtype=dtype)
            _import_xformers_ops().memory_efficient_attention(probe, probe, probe)
            _XFORMERS_PROBES[key] = None
        except Exception as error:  # noqa: BLE001 - any failure means: do not pick xformers
            message = str(error).strip().splitlines()
            _XFORMERS_PROBES[key] = (
                f"xformers' kernels cannot run it here ({type(error).__name__}: {message[0] if message else ''})"
            )
    return _XFORMERS_PROBES[key]


class XformersBackend(AttentionBackend):
    """xformers `memory_efficient_attention` (CUDA only).

    Groups of unequal size run in a single kernel call under a block-diagonal bias over
    the concatenated groups of the whole batch.
    """

    name = "xformers"
    _DTYPES = (torch.float16, torch.bfloat16, torch.float32)

    def unsupported_reasons(self, q, dropout_p):
        reasons = []
        if not XFORMERS_INSTALLED:
            reasons.append("the xformers package is not installed (pip install 'vitblocks[xformers]')")
        if q.device.type != "cuda":
            reasons.append(
                f"tensors are on {q.device.type}, and xformers' memory-efficient attention runs on CUDA only"
            )
        if q.dtype not in self._DTYPES:
            reasons.append(f"dtype {q.dtype} is not one of float16, bfloat16, float32")
        if not reasons:
            problem = xformers_kernel_problem(str(q.device), q.dtype, q.shape[-1])
            if problem:
                reasons.append(problem)
        return reasons

    def attend(self, q, k, v, scale, dropout_p, attn_bias=None):
        ops = _import_xformers_ops()
        return ops.memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=dropout_p, scale=scale)

    def attend_groups(self, q, k, v, groups, scale, dropout_p):
        if groups.num_groups == 1 or (groups.equal and not groups.num_prefix_tokens):
            return super().attend_groups(q, k, v, groups, scale, dropout_p)
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        p = groups.num_prefix_tokens
        batch, _, heads, dim = q.shape
        q_parts, k_parts, v_parts, q_lens, kv_lens = [], [], [], [], []
        for run, qg, kg, vg in _folded_runs(q, k, v, groups):
            q_parts.append(qg.reshape(1, -1, heads, dim))
            k_parts.append(kg.reshape(1, -1, heads, dim))
            v_parts.append(vg.reshape(1, -1, heads, dim))
            q_lens += [run.size] * (batch * run.count)
            kv_lens += [p + run.size] * (batch * run.count)
        bias = BlockDiagonalMask.from_seqlens(q_lens, kv_lens)
        out = self.attend(
            torch.cat(q_parts, dim=1), torch.cat(k_parts, dim=1), torch.cat(v_parts, dim=1),
            scale, dropout_p, attn_bias=bias,
        )
        outputs = [] if not p else [self.attend(q[:, :p], k, v, scale, dropout_p)]
        offset = 0
        for run in groups.runs:
            length = batch * run.count * run.size
            outputs.append(out[0, offset : offset + length].reshape(batch, run.count * run.size, heads, dim))
            offset += length
        return torch.cat(outputs, dim=1)


BACKENDS: dict[str, AttentionBackend] = {
    backend.name: backend for backend in (XformersBackend(), SdpaBackend(), MathBackend())
}
"""Every backend by name, in the order `auto` tries them."""
