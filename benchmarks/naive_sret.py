"""SReT computed the way the official code computes it: the benchmarks' naive baseline.

The architecture, parameter names and forward pass follow the official model (see
`docs/official.md`), so a checkpoint exported from a vitblocks SReT loads here with
`load_state_dict` and both compute the same function. The computation keeps the
official code's choices on purpose, because they are what the optimized path is
measured against:

- attention as explicit `q @ k^T`, softmax, `@ v` on a 6-D reshape / permute of the
  fused qkv projection;
- the loop-2 permutation as an index gather `x[:, idx]` drawn with `torch.randperm` on
  every call (also in eval), undone with a second gather through `argsort(idx)`;
- the attention output put back through a channels-first reshape and transpose before
  the output projection;
- every shared block listed once per loop, with the loop read from its position.
"""

from __future__ import annotations

import torch
from torch import nn


class Coefficient(nn.Module):
    """A learnable scalar (the official `LearnableCoefficient`), initialised to 1."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.bias


class Mlp(nn.Module):
    """Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GroupAttention(nn.Module):
    """Group attention with matmul-softmax and index-gather permutations."""

    def __init__(self, dim: int, heads: int, groups1: int, groups2: int) -> None:
        super().__init__()
        self.heads, self.groups1, self.groups2 = heads, groups1, groups2
        self.scale = (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, second_loop: bool) -> torch.Tensor:
        b, n, c = x.shape
        g = self.groups2 if second_loop else self.groups1
        permuted = second_loop and g != 1
        if permuted:
            idx = torch.randperm(n)
            x = x[:, idx, :]
            inverse = torch.argsort(idx)
        qkv = self.qkv(x).reshape(b, g, n // g, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(2, 3).reshape(b, g, n // g, c)
        x = x.permute(0, 3, 1, 2).reshape(b, c, n).transpose(1, 2)
        if permuted:
            x = x[:, inverse, :]
        return self.proj(x)


class Block(nn.Module):
    """Pre-norm block with four learnable residual scalars."""

    def __init__(self, dim: int, heads: int, groups1: int, groups2: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = GroupAttention(dim, heads, groups1, groups2)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.coefficient1, self.coefficient2 = Coefficient(), Coefficient()
        self.coefficient3, self.coefficient4 = Coefficient(), Coefficient()

    def forward(self, x: torch.Tensor, second_loop: bool) -> torch.Tensor:
        x = self.coefficient1(x) + self.coefficient2(self.attn(self.norm1(x), second_loop))
        return self.coefficient3(x) + self.coefficient4(self.mlp(self.norm2(x)))


class Mix(nn.Module):
    """The non-linear mixing layer: `b1 * x + b2 * MLP(LN(x))`."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * ratio))
        self.coefficient1, self.coefficient2 = Coefficient(), Coefficient()

    def forward(self, x: torch.Tensor, second_loop: bool) -> torch.Tensor:
        return self.coefficient1(x) + self.coefficient2(self.mlp(self.norm1(x)))


class Stage(nn.Module):
    """Unique blocks applied twice each, every application followed by its own mix."""

    def __init__(self, dim: int, heads: int, depth: int, unique: int, groups1: int, groups2: int,
                 mlp_ratio: float, mix_ratio: float) -> None:
        super().__init__()
        blocks = [Block(dim, heads, groups1, groups2, mlp_ratio) for _ in range(unique)]
        loops = depth // unique
        mixes = [Mix(dim, mix_ratio) for _ in range(depth)]
        order: list[nn.Module] = []
        for j in range(unique):
            for loop in range(loops):
                order += [blocks[j], mixes[j * loops + loop]]
        self.blocks = nn.ModuleList(order)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for i, layer in enumerate(self.blocks):
            x = layer(x, (i + 2) % 4 == 0)
        return x.transpose(1, 2).reshape(b, c, h, w)


class Pool(nn.Module):
    """Depthwise 3x3 stride-2 convolution that doubles the channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, groups=c_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Stem(nn.Module):
    """Three 3x3 stride-2 convolutions, each with BatchNorm and ReLU."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        widths = [c_in, c // 2, c, c]
        for i in range(3):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2, 3):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


class NaiveSReT(nn.Module):
    """SReT-T / LT / S as the official code builds and computes them (depths 4/10/6, unique 2/5/3).

    Args:
        dims: Channels per stage.
        heads: Attention heads per stage.
        groups1: Loop-1 groups per stage.
        groups2: Loop-2 groups per stage.
        mlp_ratio: Block MLP ratio.
        mix_ratio: Mixing-layer MLP ratio.
        image_size: Input side length (the position map is image_size / 8 square).
        num_classes: Classifier outputs.
    """

    def __init__(self, dims: tuple[int, ...] = (64, 128, 256), heads: tuple[int, ...] = (2, 4, 8),
                 groups1: tuple[int, ...] = (8, 4, 1), groups2: tuple[int, ...] = (2, 1, 1),
                 mlp_ratio: float = 3.6, mix_ratio: float = 1.0, image_size: int = 224,
                 num_classes: int = 1000) -> None:
        super().__init__()
        self.patch_embed = Stem(3, dims[0])
        self.pos_embed = nn.Parameter(torch.randn(1, dims[0], image_size // 8, image_size // 8) * 0.02)
        self.transformers = nn.ModuleList(
            Stage(dims[s], heads[s], (4, 10, 6)[s], (2, 5, 3)[s], groups1[s], groups2[s], mlp_ratio, mix_ratio)
            for s in range(3)
        )
        self.pools = nn.ModuleList(Pool(dims[s], dims[s + 1]) for s in range(2))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for s in range(2):
            x = self.pools[s](self.transformers[s](x))
        x = self.transformers[2](x)
        return self.head(self.norm(x.mean(dim=(2, 3))))
