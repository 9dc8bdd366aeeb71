"""Token permutations that shuffle which tokens share an attention group.

Policies:

- `"random"`: a fresh permutation per call, drawn by `torch.randperm` on the input's own
  device with that device's default generator (seeded by `torch.manual_seed`), so a GPU
  run makes no host-to-device copy and no synchronisation per call.
- `"random_cpu"`: a fresh permutation per call drawn on the CPU default generator and
  copied to the input's device, as the paper's code does: the same seed gives the same
  permutations on every device, exactly those of the official code. On the CPU it is
  the same stream as `"random"`.
- `"fixed"`: a permutation that depends only on the token count and a seed, computed by
  hashing token positions on the input's device; repeatable and free of host-device
  copies, so inference is deterministic and compiles into one graph.
- `"none"`: no permutation; groups stay contiguous raster-order chunks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes

from vitblocks.layers.custom_backward import custom_backward_applies
from vitblocks.layers.modes import PermutationPolicy

PERMUTATION_POLICIES = tuple(p.value for p in PermutationPolicy)


def check_policy(policy: PermutationPolicy | str, argument: str) -> PermutationPolicy:
    """Validate a permutation policy name ("official" names the "random_cpu" policy).

    Args:
        policy: The name to check.
        argument: The argument name to show in the error.

    Returns:
        The policy.

    Raises:
        ValueError: If `policy` is not one of `PERMUTATION_POLICIES`.
    """
    try:
        return PermutationPolicy.parse(policy, argument)
    except ValueError:
        raise ValueError(f"{argument}={policy!r} is not a permutation policy; "
                         f"choose one of {PERMUTATION_POLICIES}") from None


def random_permutation(
    num_tokens: int, device: torch.device | str | None = None, on_cpu_generator: bool = False
) -> torch.Tensor:
    """A uniformly random permutation of `num_tokens` positions.

    Args:
        num_tokens: Length of the permutation.
        device: Where the result should live.
        on_cpu_generator: Draw on the CPU default generator and copy to `device` (the
            official code's stream, any device) instead of drawing on `device` itself.

    Returns:
        int64 tensor of shape (num_tokens,).

    Examples:
        >>> _ = torch.manual_seed(0)
        >>> a = random_permutation(5)
        >>> _ = torch.manual_seed(0)
        >>> a.equal(random_permutation(5, on_cpu_generator=True))
        True
    """
    if on_cpu_generator:
        return torch.randperm(num_tokens).to(device)
    return torch.randperm(num_tokens, device=device)


def fixed_permutation(num_tokens: int, seed: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """A deterministic pseudo-random permutation of `num_tokens` positions.

    Positions are ranked by a 32-bit integer hash of (position, seed), so the result is
    the same on every device and in every process. TorchScript compiles it (a scripted
    sliced attention layer calls it).

    Args:
        num_tokens: Length of the permutation.
        seed: Any non-negative integer; different seeds give unrelated permutations.
        device: Device of the result (a device name works too).

    Returns:
        int64 tensor of shape (num_tokens,).

    Examples:
        >>> fixed_permutation(6, seed=1).sort().values.tolist()
        [0, 1, 2, 3, 4, 5]
    """
    mask32 = 0xFFFFFFFF  # a local: TorchScript cannot read module globals
    h = torch.arange(num_tokens, dtype=torch.int64, device=device)
    h = (h * 0x9E3779B1 + ((seed * 0x85EBCA77 + 0x165667B1) & mask32)) & mask32
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & mask32
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & mask32
    h = ((h ^ (h >> 16)) * 0x297A2D39) & mask32
    return torch.argsort(h ^ (h >> 16), stable=True)


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    tracing_state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with _disable_current_modes():
            yield
    finally:
        torch._C._set_tracing_state(tracing_state)


_FIXED_TENSORS: dict[tuple[int, int, bool, str], torch.Tensor] = {}


@torch.compiler.assume_constant_result  # traced graphs hold the result as one constant tensor
def _fixed_permutation_constant(num_tokens: int, seed: int, inverse: bool, device: str) -> torch.Tensor:
    key = (num_tokens, seed, inverse, device)
    if key not in _FIXED_TENSORS:
        # a real tensor even while a tracer runs (export's fake and proxy modes, the JIT
        # tracer of the legacy ONNX exporter): the cache never holds a traced value, and
        # no trace records the hash
        with _untraced():
            perm = fixed_permutation(num_tokens, seed, torch.device(device))
            _FIXED_TENSORS[key] = inverse_permutation(perm) if inverse else perm
    return _FIXED_TENSORS[key]


@torch.compiler.assume_constant_result  # torch.compile takes the values as constants
def _fixed_permutation_values(num_tokens: int, seed: int, inverse: bool) -> tuple[int, ...]:
    return tuple(_fixed_permutation_constant(num_tokens, seed, inverse, "cpu").tolist())


def cached_fixed_permutation(
    num_tokens: int, seed: int, device: torch.device | str | None = None, inverse: bool = False
) -> torch.Tensor:
    """`fixed_permutation` (or its inverse), computed once per process and device.

    It depends only on Python ints, so layers look it up instead of hashing on every
    call; `torch.export`, the ONNX exporters and `torch.jit.trace` take it as one
    constant tensor and `torch.compile` as constant values, so the hash and its stable
    sort (which ONNX has no operator for) never enter a traced graph.

    Args:
        num_tokens: Length of the permutation.
        seed: Seed, as for `fixed_permutation`.
        device: Device of the result.
        inverse: Return the inverse permutation instead.

    Returns:
        int64 tensor of shape (num_tokens,); do not modify it in place.

    Examples:
        >>> cached_fixed_permutation(6, 1).equal(fixed_permutation(6, seed=1))
        True
    """
    if torch.compiler.is_dynamo_compiling():
        # torch.compile (and a strict export): the values enter the graph as constants. Not
        # is_exporting(): torch 2.11's Dynamo answers True to it inside torch.compile too
        return torch.tensor(_fixed_permutation_values(num_tokens, seed, inverse), dtype=torch.int64, device=device)
    return _fixed_permutation_constant(num_tokens, seed, inverse, str(torch.device(device or "cpu")))


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes another.

    Args:
        perm: A permutation of 0..n-1.

    Returns:
        `inverse` such that `perm[inverse] == arange(n)` and `inverse[perm] == arange(n)`.
    """
    return torch.argsort(perm)  # one operator; a permutation's values are distinct, so no order is ambiguous


def permute_tokens(x: torch.Tensor, perm: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Reorder the patch tokens of `x`, leaving prefix tokens in front.

    Args:
        x: Tokens of shape (B, P + N, C).
        perm: Permutation of the N patch tokens; output token P + i is input token
            P + perm[i].
        num_prefix_tokens: P.

    Returns:
        Tensor of the same shape as `x`.
    """
    if num_prefix_tokens == 0:
        return x.index_select(1, perm)
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    return torch.cat([prefix, patches.index_select(1, perm)], dim=1)


class _PermuteTokens(torch.autograd.Function):
    """`x.index_select(1, perm)` whose backward gathers with the inverse permutation.

    Autograd's own backward of `index_select` scatters into zeros (two operators, and
    atomic adds on a GPU); for a permutation, gathering with its inverse is the same
    result in one operator.
    """

    @staticmethod
    def forward(ctx, x, perm, inverse):  # noqa: D102 - see the class
        ctx.save_for_backward(inverse)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def permute_tokens_with_inverse(
    x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor, num_prefix_tokens: int = 0
) -> torch.Tensor:
    """`permute_tokens`, given the inverse permutation too, so that its backward pass is one gather.

    Args:
        x: Tokens of shape (B, P + N, C).
        perm: Permutation of the N patch tokens.
        inverse: Its inverse.
        num_prefix_tokens: P.

    Returns:
        Tensor of the same shape as `x`, equal to `permute_tokens(x, perm, num_prefix_tokens)`.
    """
    if not custom_backward_applies(x):
        return permute_tokens(x, perm, num_prefix_tokens)
    if num_prefix_tokens == 0:
        return _PermuteTokens.apply(x, perm, inverse)
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    return torch.cat([prefix, _PermuteTokens.apply(patches, perm, inverse)], dim=1)
