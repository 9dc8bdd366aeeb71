"""Choosing an attention backend, and the `group_attention` entry point.

A backend is chosen, first match wins, by:

1. the `backend` argument of the call (or of the layer that makes the call);
2. the innermost `attention_backend(...)` context;
3. the environment variable `VITBLOCKS_ATTENTION` (read at every call);
4. `"auto"`: the first backend in `auto_order` that supports the input: registered
   backends by priority (sdpa, xformers, math), except that bfloat16 on the CPU with at
   most `CPU_BF16_MATH_MAX_KEYS` keys per group tries `math` first (see
   `auto_prefers_math`). On CUDA the order is what was measured: on an NVIDIA H200 in
   bfloat16, SDPA ran sliced attention forward + backward 1.8-2.9x faster than xformers
   and 1.3-2.0x faster than `math` at every sliced shape of SReT-T, the sliced DeiT-Tiny
   and PiT-Ti (docs/benchmarks.md, "GPU check, 2026-12-04"). As SDPA runs every
   floating-point input, `auto` reaches xformers only where SDPA is unregistered; ask for
   it by name.

A backend named explicitly that cannot run the input raises `AttentionBackendError`
with every reason; `auto` never raises for that, because `math` runs everything.

The context is a `contextvars.ContextVar`: each thread (and asyncio task) sees its own
choice, so concurrent `attention_backend(...)` blocks do not leak into each other.
`torch.compile` reads it once, while tracing, and compiles that choice into the graph:
a compiled model keeps the backend of the context it was first called in. To switch,
compile again (a new `torch.compile(model)`, or `torch._dynamo.reset()`), or name the
backend on the layers (`backend=`), which the graph then follows.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
from timm.layers import use_fused_attn

from vitblocks.attention.backends import AttentionBackend
from vitblocks.attention.groups import TokenGroups
from vitblocks.attention.registry import AUTO, BACKENDS, backend_names

ENV_VAR = "VITBLOCKS_ATTENTION"

_chosen_in_context: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitblocks_attention", default=None)

CPU_BF16_MATH_MAX_KEYS = 256
"""Longest key sequence for which `auto` runs bfloat16 CPU attention with `math`."""


class AttentionBackendError(RuntimeError):
    """A backend that was asked for by name cannot run the given input."""


def _check_name(name: str, source: str) -> str:
    if name not in backend_names():
        raise ValueError(f"unknown attention backend {name!r} from {source}; choose one of {backend_names()}")
    return name


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` for every attention call in this block that names none itself.

    Args:
        name: One of "auto", "sdpa", "xformers", "math".

    Returns:
        A context manager; the previous choice is restored on exit.

    Raises:
        ValueError: For an unknown backend name.

    Examples:
        >>> import torch
        >>> from vitblocks.attention import attention_backend, group_attention
        >>> q = torch.randn(1, 8, 2, 4)
        >>> with attention_backend("math"):
        ...     out = group_attention(q, q, q, groups=2)
        >>> out.shape
        torch.Size([1, 8, 2, 4])
    """
    token = _chosen_in_context.set(_check_name(name, "attention_backend()"))
    try:
        yield
    finally:
        _chosen_in_context.reset(token)


@torch.compiler.assume_constant_result
def _context_choice() -> str | None:
    # torch 2.11's Dynamo cannot trace ContextVar.get and split the graph at every
    # attention call; read while tracing, the choice becomes a constant of the graph.
    return _chosen_in_context.get()


def requested_backend(backend: str | None = None) -> str:
    """The backend name in force for a call.

    Args:
        backend: The call's own choice, or None for no preference.

    Returns:
        The name chosen by the call, the innermost context, the environment, or "auto".
    """
    if backend is not None:
        return _check_name(backend, "the backend argument")
    chosen = _context_choice()
    if chosen is not None:
        return chosen
    return _check_name(os.environ.get(ENV_VAR, AUTO), f"the {ENV_VAR} environment variable")


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


def auto_order(q: torch.Tensor, kv_len: int | None = None) -> list[AttentionBackend]:
    """The backends `auto` tries for an input, in order; it takes the first that supports it.

    Registered backends by priority, with `math` moved to the front where
    `auto_prefers_math` says so, or where timm's fused-attention switch is off
    (`TIMM_FUSED_ATTN=0`, `timm.layers.set_fused_attn(False)`, or timm's exportable mode),
    as timm's own attention layers then compute attention explicitly.

    Args:
        q: Queries of shape (B, N, H, D).
        kv_len: Keys each query attends to (default: N).

    Returns:
        Backends, first choice first.

    Examples:
        >>> " > ".join(b.name for b in auto_order(torch.empty(1, 196, 3, 64)))
        'sdpa > xformers > math'
        >>> " > ".join(b.name for b in auto_order(torch.empty(1, 196, 3, 64, dtype=torch.bfloat16)))
        'math > sdpa > xformers'
    """
    order = list(BACKENDS.values())
    explicit = not use_fused_attn() or auto_prefers_math(q, q.shape[1] if kv_len is None else kv_len)
    if "math" in BACKENDS and explicit:
        order.remove(BACKENDS["math"])
        order.insert(0, BACKENDS["math"])
    return order


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
    if name == AUTO:
        for candidate in auto_order(q, kv_len):
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


def available_backends(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, head_dim: int = 32
) -> list[str]:
    """Backends that can run on a device and dtype.

    Args:
        device: The device to check.
        dtype: The tensor dtype to check.
        head_dim: Channels per head of the probe input (xformers' kernels refuse some
            sizes, 1 among them).

    Returns:
        Backend names in the order `auto` tries them.
    """
    probe = torch.empty(1, 1, 1, head_dim, device=device, dtype=dtype)
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
        backend: "auto", a registered backend ("sdpa", "xformers", "math", ...), or
            None for the context / environment choice.

    Returns:
        Tensor of shape (B, N, H, D).

    Raises:
        ValueError: If the shapes disagree or the groups do not fit the tokens.
        AttentionBackendError: If a backend chosen by name cannot run the input.

    Examples:
        >>> import torch
        >>> q = torch.randn(2, 10, 3, 8)
        >>> group_attention(q, q, q, groups=4, backend="math").shape
        torch.Size([2, 10, 3, 8])
    """
    tracing = torch.jit.is_tracing()  # a trace records no check (and would warn on each)
    if not tracing and (q.dim() != 4 or k.shape != q.shape or v.shape != q.shape):
        raise ValueError(
            "q, k and v must share one shape (batch, tokens, heads, head_dim); got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not isinstance(groups, TokenGroups):
        try:
            groups = TokenGroups(q.shape[1] - num_prefix_tokens, groups, num_prefix_tokens)
        except ValueError as error:
            raise ValueError(
                f"{error}. group_attention takes (batch, tokens, heads, head_dim) tensors and got "
                f"{tuple(q.shape)}; if yours are (batch, heads, tokens, head_dim), pass q.transpose(1, 2)"
            ) from None
    elif not tracing and groups.num_prefix_tokens + groups.num_tokens != q.shape[1]:
        raise ValueError(
            f"groups describe {groups.num_prefix_tokens} + {groups.num_tokens} tokens "
            f"but the input has {q.shape[1]}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv_len = groups.num_prefix_tokens + groups.runs[0].size  # the largest group's keys
    chosen = select_backend(q, dropout_p, backend, kv_len)
    return chosen.attend_groups(q, k, v, groups, scale, dropout_p)
