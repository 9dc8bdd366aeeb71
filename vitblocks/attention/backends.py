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

from vitblocks.attention.groups import GroupRun, TokenGroups, fold_run, with_prefix
from vitblocks.attention.xformers_runtime import preload_cuda12_runtime, runtime_advice

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _folded_runs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: TokenGroups
) -> Iterator[tuple[GroupRun, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For each run of equal groups: its patch queries folded into the batch dimension,
    and its keys and values with the prefix tokens' keys and values prepended."""
    p = groups.num_prefix_tokens
    for run in groups.runs:
        qg, kg, vg = (fold_run(t[:, p:], *run) for t in (q, k, v))
        if p:
            kg = with_prefix(kg, k[:, :p], run.count)
            vg = with_prefix(vg, v[:, :p], run.count)
        yield run, qg, kg, vg


class AttentionBackend:
    """One attention kernel, and what it can run.

    A backend declares its capabilities as class attributes; `unsupported_reasons`
    derives from them why an input is refused, and subclasses add checks that
    attributes cannot express through `extra_reasons` (a missing package, a kernel that
    does not load). Subclasses implement `attend` (unmasked attention); `attend_groups`
    turns grouped attention into `attend` calls and may be overridden by a kernel with
    a cheaper way. Register a new kernel with `vitblocks.attention.register_backend`.

    Attributes:
        name: The name users choose it by.
        priority: Order in which `auto` tries backends: higher first.
        devices: Device types it runs on (e.g. `("cuda",)`), or None for any.
        dtypes: Tensor dtypes it takes.
        max_head_dim: Largest channels per head, or None for no limit.
        supports_dropout: Whether it applies dropout on the attention weights.
    """

    name: str = ""
    priority: int = 0
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = _FLOAT_DTYPES
    max_head_dim: int | None = None
    supports_dropout: bool = True

    def unsupported_reasons(self, q: torch.Tensor, dropout_p: float = 0.0) -> list[str]:
        """Why this backend cannot run an input like `q`; empty when it can.

        Args:
            q: Queries of shape (B, N, H, D).
            dropout_p: Attention dropout probability that will be applied.

        Returns:
            Human-readable reasons, one per problem.
        """
        reasons = []
        if self.devices is not None and q.device.type not in self.devices:
            reasons.append(f"tensors are on {q.device.type}, and {self.name} runs on "
                           f"{' / '.join(d.upper() for d in self.devices)} only")
        if not q.dtype.is_floating_point:
            reasons.append(f"dtype {q.dtype} is not a floating-point type")
        elif q.dtype not in self.dtypes:
            reasons.append(f"dtype {q.dtype} is not one of "
                           f"{', '.join(str(d).removeprefix('torch.') for d in self.dtypes)}")
        if self.max_head_dim is not None and q.shape[-1] > self.max_head_dim:
            reasons.append(f"head size {q.shape[-1]} is above {self.name}'s limit of {self.max_head_dim}")
        if dropout_p > 0 and not self.supports_dropout:
            reasons.append(f"{self.name} does not apply attention dropout (got dropout_p={dropout_p})")
        return reasons + self.extra_reasons(q, capable=not reasons)

    def extra_reasons(self, q: torch.Tensor, capable: bool) -> list[str]:
        """Checks beyond the declared capabilities.

        Args:
            q: Queries of shape (B, N, H, D).
            capable: Whether the declared capabilities cover `q` (checks that run a
                kernel should run only then).

        Returns:
            Reasons; none by default.
        """
        return []

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
    priority = 0

    def attend(self, q, k, v, scale, dropout_p):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        # softmax accumulates in float32 for half inputs on its own; asking for a float32
        # result instead would keep a float32 copy of the weights for backward.
        weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if dropout_p > 0:
            weights = F.dropout(weights, p=dropout_p)
        return (weights @ v).transpose(1, 2)


CUDA_HEAD_DIM_MULTIPLE = 8
"""Head size that `sdpa` pads half-precision CUDA inputs up to a multiple of.

PyTorch's memory-efficient and cuDNN attention kernels take only head sizes that are
multiples of 8. On an H200 in bfloat16, SReT-S's 42-channel heads ran attention forward
+ backward 1.6-1.9x faster when padded to 48 before the call, at every sliced shape;
padding inside the call measured 1.1-1.4x against the unpadded run, across two runs on
two machines (docs/benchmarks.md, "GPU check, 2026-12-04").
"""


def _pad_heads(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[-1] % multiple
    return F.pad(t, (0, pad)) if pad else t


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float, head_multiple: int = 1
) -> torch.Tensor:
    """`scaled_dot_product_attention` on token-major tensors, heads zero-padded if asked.

    Zero channels added to queries and keys leave every query-key product unchanged,
    and those added to values give output channels that are cut off again, so padding
    changes only which kernel runs.

    Args:
        q: Queries (B, Nq, H, D).
        k: Keys (B, Nk, H, D).
        v: Values (B, Nk, H, Dv).
        scale: Factor applied to the query-key products.
        dropout_p: Dropout probability on the attention weights.
        head_multiple: Pad D and Dv up to multiples of this (1: no padding).

    Returns:
        Output of shape (B, Nq, H, Dv).

    Examples:
        >>> q = torch.randn(2, 5, 3, 6)
        >>> out = sdpa_attention(q, q, q, 6**-0.5, 0.0, head_multiple=8)
        >>> torch.allclose(out, sdpa_attention(q, q, q, 6**-0.5, 0.0), atol=1e-6)
        True
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if head_multiple == 1:  # no shape arithmetic at all: traces stay free of size-dependent branches
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale).transpose(1, 2)
    value_dim = v.shape[-1]
    q, k, v = (_pad_heads(t, head_multiple) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out[..., :value_dim].transpose(1, 2)


class SdpaBackend(AttentionBackend):
    """PyTorch's `scaled_dot_product_attention` (flash / memory-efficient / cuDNN / math).

    On CUDA in float16 and bfloat16, heads whose size is not a multiple of
    `CUDA_HEAD_DIM_MULTIPLE` are zero-padded so that a fused kernel runs them.
    """

    name = "sdpa"
    priority = 10

    def attend(self, q, k, v, scale, dropout_p):
        multiple = CUDA_HEAD_DIM_MULTIPLE if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else 1
        return sdpa_attention(q, k, v, scale, dropout_p, multiple)


# find_spec does not import: importing xformers where it cannot run prints warnings.
XFORMERS_INSTALLED = importlib.util.find_spec("xformers") is not None


@functools.cache
def _import_xformers_ops() -> ModuleType:
    preload_cuda12_runtime()  # before xformers' _C.so is loaded: it links libcudart.so.12
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
            advice = runtime_advice() if device.startswith("cuda") else ""
            _XFORMERS_PROBES[key] = (
                f"xformers' kernels cannot run it here ({type(error).__name__}: {message[0] if message else ''})"
                + (f"; {advice}" if advice else "")
            )
    return _XFORMERS_PROBES[key]


class XformersBackend(AttentionBackend):
    """xformers `memory_efficient_attention` (CUDA only).

    Groups of unequal size run in a single kernel call under a block-diagonal bias over
    the concatenated groups of the whole batch.

    `auto` tries it after `sdpa`: on an H200 in bfloat16 (xformers 0.0.35, torch 2.11)
    it ran sliced attention forward + backward at 0.35-0.55x SDPA's speed at every
    sliced shape of SReT-T, the sliced DeiT-Tiny and PiT-Ti
    (docs/benchmarks.md, "GPU check, 2026-12-04"). Ask for it by name to use it.
    """

    name = "xformers"
    priority = 5
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def extra_reasons(self, q, capable):
        if not XFORMERS_INSTALLED:
            return ["the xformers package is not installed (pip install 'vitblocks[xformers]')"]
        problem = xformers_kernel_problem(str(q.device), q.dtype, q.shape[-1]) if capable else None
        return [problem] if problem else []

    def attend(self, q, k, v, scale, dropout_p):
        return self._attend_with_bias(q, k, v, scale, dropout_p, None)

    @staticmethod
    def _attend_with_bias(q, k, v, scale, dropout_p, attn_bias):
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
        out = self._attend_with_bias(
            torch.cat(q_parts, dim=1), torch.cat(k_parts, dim=1), torch.cat(v_parts, dim=1), scale, dropout_p, bias,
        )
        outputs = [] if not p else [self.attend(q[:, :p], k, v, scale, dropout_p)]
        offset = 0
        for run in groups.runs:
            length = batch * run.count * run.size
            outputs.append(out[0, offset : offset + length].reshape(batch, run.count * run.size, heads, dim))
            offset += length
        return torch.cat(outputs, dim=1)


BUILTIN_BACKENDS: tuple[AttentionBackend, ...] = (XformersBackend(), SdpaBackend(), MathBackend())
"""The kernels vitblocks ships; `vitblocks.attention.registry` registers them."""
