"""Choosing an attention backend, and the `group_attention` entry point.

A backend is chosen, first match wins, by:

1. the `backend` argument of the call (or of the layer that makes the call);
2. the innermost `attention_backend(...)` context;
3. the environment variable `VITBLOCKS_ATTENTION` (read at every call);
4. `"auto"`: the first of xformers, sdpa, math that supports the input, except that
   bfloat16 on the CPU with at most `CPU_BF16_MATH_MAX_KEYS` keys per group goes to
   `math` (see `auto_prefers_math`). On CUDA the order is what was measured: on an
   NVIDIA H200 in bfloat16, SDPA beat `math` at every SReT-T attention shape, by
   1.2-2.4x in training and 2-5x in inference (docs/benchmarks.md, "GPU: NVIDIA H200",
   group "attention"); xformers is only picked where its kernels actually run here.

A backend named explicitly that cannot run the input raises `AttentionBackendError`
with every reason; `auto` never raises for that, because `math` runs everything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from vitblocks.attention.backends import BACKENDS, AttentionBackend
from vitblocks.attention.groups import TokenGroups

ENV_VAR = "VITBLOCKS_ATTENTION"
BACKEND_NAMES = ("auto", *BACKENDS)

_context_stack: list[str] = []

CPU_BF16_MATH_MAX_KEYS = 256
"""Longest key sequence for which `auto` runs bfloat16 CPU attention with `math`."""


class AttentionBackendError(RuntimeError):
    """A backend that was asked for by name cannot run the given input."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r} from {source}; choose one of {BACKEND_NAMES}")
    return name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` for every attention call in this block that names none itself.

    Args:
        name: One of "auto", "xformers", "sdpa", "math".

    Returns:
        A context manager; the previous choice is restored on exit.

    Raises:
        ValueError: For an unknown backend name.

    Example:
        >>> import torch
        >>> from vitblocks.attention import attention_backend, group_attention
        >>> q = torch.randn(1, 8, 2, 4)
        >>> with attention_backend("math"):
        ...     out = group_attention(q, q, q, groups=2)
        >>> out.shape
        torch.Size([1, 8, 2, 4])
    """
    _context_stack.append(_check_name(name, "attention_backend()"))
    try:
        yield
    finally:
        _context_stack.pop()


def requested_backend(backend: str | None = None) -> str:
    """The backend name in force for a call.

    Args:
        backend: The call's own choice, or None for no preference.

    Returns:
        The name chosen by the call, the innermost context, the environment, or "auto".
    """
    if backend is not None:
        return _check_name(backend, "the backend argument")
    if _context_stack:
        return _context_stack[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto"), f"the {ENV_VAR} environment variable")


def auto_prefers_math(q: torch.Tensor, kv_len: int) -> bool:
    """Whether `auto` should run an input with `math` although `sdpa` supports it.

    PyTorch's CPU flash-attention kernel is slow in bfloat16 on short sequences, above
    all in its backward pass, while explicit matmul-softmax runs on oneDNN's bfloat16
    GEMMs: on SReT-T's groups (49-196 keys) `math` trains 2-5x faster; at 392 keys
    `sdpa` is faster again (`benchmarks/`, group "backends").

    Args:
        q: Queries of shape (B, N, H, D).
        kv_len: Keys each query attends to (its group plus the prefix tokens).

    Returns:
        True for bfloat16 CPU inputs with at most `CPU_BF16_MATH_MAX_KEYS` keys.
    """
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and kv_len <= CPU_BF16_MATH_MAX_KEYS


def select_backend(
    q: torch.Tensor, dropout_p: float = 0.0, backend: str | None = None, kv_len: int | None = None
) -> AttentionBackend:
    """Resolve the backend that will run an input like `q`.

    Args:
        q: Queries of shape (B, N, H, D).
        dropout_p: Attention dropout probability.
        backend: Explicit choice, or None to follow the context / environment.
        kv_len: Keys each query attends to, when grouping makes it shorter than N.

    Returns:
        The backend object.

    Raises:
        AttentionBackendError: If a backend chosen by name cannot run the input.
    """
    name = requested_backend(backend)
    if name == "auto" and auto_prefers_math(q, q.shape[1] if kv_len is None else kv_len):
        name = "math"
    if name == "auto":
        for candidate in BACKENDS.values():
            if not candidate.unsupported_reasons(q, dropout_p):
                return candidate
        name = "math"
    chosen = BACKENDS[name]
    reasons = chosen.unsupported_reasons(q, dropout_p)
    if reasons:
        raise AttentionBackendError(
            f"attention backend {name!r} cannot run this input "
            f"(shape {tuple(q.shape)}, {q.dtype}, {q.device.type}): " + "; ".join(reasons)
            + ". Choose another backend or use 'auto'."
        )
    return chosen


def available_backends(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run on a device and dtype.

    Args:
        device: The device to check.
        dtype: The tensor dtype to check.

    Returns:
        Backend names in the order `auto` tries them.
    """
    probe = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    return [name for name, b in BACKENDS.items() if not b.unsupported_reasons(probe, 0.0)]


def group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: int | TokenGroups = 1,
    *,
    num_prefix_tokens: int = 0,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head attention within groups of tokens.

    The sequence is `num_prefix_tokens` prefix tokens followed by patch tokens; the
    patch tokens are cut into `groups` contiguous, near-equal groups. Patch tokens
    attend to their own group and to the prefix tokens; prefix tokens attend to all.

    Args:
        q: Queries of shape (B, N, H, D) — tokens before heads, as a fused qkv
            projection lays them out.
        k: Keys, same shape as `q`.
        v: Values, same shape as `q`.
        groups: Number of groups of patch tokens, or a ready `TokenGroups`.
        num_prefix_tokens: Prefix tokens at the front (ignored if `groups` is a
            `TokenGroups`, which carries its own).
        scale: Factor on query-key products; defaults to D ** -0.5.
        dropout_p: Dropout probability on the attention weights.
        backend: "auto", "xformers", "sdpa", "math", or None for the context /
            environment choice.

    Returns:
        Tensor of shape (B, N, H, D).

    Raises:
        ValueError: If the shapes disagree or the groups do not fit the tokens.
        AttentionBackendError: If a backend chosen by name cannot run the input.

    Example:
        >>> import torch
        >>> q = torch.randn(2, 10, 3, 8)
        >>> group_attention(q, q, q, groups=4, backend="math").shape
        torch.Size([2, 10, 3, 8])
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "q, k and v must share one shape (batch, tokens, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not isinstance(groups, TokenGroups):
        groups = TokenGroups(q.shape[1] - num_prefix_tokens, groups, num_prefix_tokens)
    elif groups.num_prefix_tokens + groups.num_tokens != q.shape[1]:
        raise ValueError(
            f"groups describe {groups.num_prefix_tokens} + {groups.num_tokens} tokens "
            f"but the input has {q.shape[1]}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv_len = groups.num_prefix_tokens + groups.runs[0].size  # the largest group's keys
    chosen = select_backend(q, dropout_p, backend, kv_len)
    return chosen.attend_groups(q, k, v, groups, scale, dropout_p)
