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

import torch

from vitblocks.layers.modes import PermutationPolicy

PERMUTATION_POLICIES = tuple(p.value for p in PermutationPolicy)

_MASK32 = 0xFFFFFFFF


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
        raise ValueError(f"{argument}={policy!r} is not a permutation policy; choose one of {PERMUTATION_POLICIES}") from None


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

    Example:
        >>> _ = torch.manual_seed(0)
        >>> a = random_permutation(5)
        >>> _ = torch.manual_seed(0)
        >>> a.equal(random_permutation(5, on_cpu_generator=True))
        True
    """
    if on_cpu_generator:
        return torch.randperm(num_tokens).to(device)
    return torch.randperm(num_tokens, device=device)


def fixed_permutation(num_tokens: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """A deterministic pseudo-random permutation of `num_tokens` positions.

    Positions are ranked by a 32-bit integer hash of (position, seed), so the result is
    the same on every device and in every process.

    Args:
        num_tokens: Length of the permutation.
        seed: Any non-negative integer; different seeds give unrelated permutations.
        device: Device of the result.

    Returns:
        int64 tensor of shape (num_tokens,).

    Example:
        >>> fixed_permutation(6, seed=1).sort().values.tolist()
        [0, 1, 2, 3, 4, 5]
    """
    h = torch.arange(num_tokens, dtype=torch.int64, device=device)
    h = (h * 0x9E3779B1 + ((seed * 0x85EBCA77 + 0x165667B1) & _MASK32)) & _MASK32
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x2C1B3C6D), (16, 0x297A2D39)):
        h = ((h ^ (h >> shift)) * multiplier) & _MASK32
    return torch.argsort(h ^ (h >> 16), stable=True)


_FIXED_VALUES: dict[tuple[int, int, bool], tuple[int, ...]] = {}
_FIXED_TENSORS: dict[tuple[int, int, bool, str], torch.Tensor] = {}


@torch.compiler.assume_constant_result  # compiled graphs take the values as a constant
def fixed_permutation_values(num_tokens: int, seed: int, inverse: bool = False) -> tuple[int, ...]:
    """The entries of `fixed_permutation` (or of its inverse) as Python ints, cached.

    Args:
        num_tokens: Length of the permutation.
        seed: Seed, as for `fixed_permutation`.
        inverse: The inverse permutation instead.

    Returns:
        The permutation as a tuple.
    """
    key = (num_tokens, seed, inverse)
    if key not in _FIXED_VALUES:
        perm = fixed_permutation(num_tokens, seed)
        _FIXED_VALUES[key] = tuple((inverse_permutation(perm) if inverse else perm).tolist())
    return _FIXED_VALUES[key]


def cached_fixed_permutation(
    num_tokens: int, seed: int, device: torch.device | str | None = None, inverse: bool = False
) -> torch.Tensor:
    """`fixed_permutation` (or its inverse), computed once per process and device.

    It depends only on Python ints, so layers look it up instead of hashing on every
    call; under `torch.compile` it enters the graph as a constant, so the hash (whose
    64-bit constants some compiler backends cannot take) is never compiled.

    Args:
        num_tokens: Length of the permutation.
        seed: Seed, as for `fixed_permutation`.
        device: Device of the result.
        inverse: Return the inverse permutation instead.

    Returns:
        int64 tensor of shape (num_tokens,); do not modify it in place.

    Example:
        >>> cached_fixed_permutation(6, 1).equal(fixed_permutation(6, seed=1))
        True
    """
    values = fixed_permutation_values(num_tokens, seed, inverse)
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.int64, device=device)
    key = (num_tokens, seed, inverse, str(torch.device(device or "cpu")))
    if key not in _FIXED_TENSORS:
        _FIXED_TENSORS[key] = torch.tensor(values, dtype=torch.int64, device=device)
    return _FIXED_TENSORS[key]


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes another.

    Args:
        perm: A permutation of 0..n-1.

    Returns:
        `inverse` such that `perm[inverse] == arange(n)` and `inverse[perm] == arange(n)`.
    """
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


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
    if not num_prefix_tokens:
        return x.index_select(1, perm)
    prefix, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    return torch.cat([prefix, patches.index_select(1, perm)], dim=1)
