"""A minimal re-implementation of the official SReT code's model, for tests only.

It follows the official parameter layout (spec section 4) and forward pass (sections 1-3)
with plain matmul-softmax attention, so that checkpoints written from it are real
official-layout checkpoints and its outputs are the reference.
"""

import torch
from torch import nn


class Coefficient(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.bias


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, heads, groups1, groups2):
        super().__init__()
        self.heads, self.groups1, self.groups2 = heads, groups1, groups2
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, second_loop):
        b, n, c = x.shape
        g = self.groups2 if second_loop else self.groups1
        permuted = second_loop and g != 1
        if permuted:
            idx = torch.randperm(n)
            x = x[:, idx]
        qkv = self.qkv(x).reshape(b, g, n // g, 3, self.heads, c // self.heads).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        x = (attn @ v).permute(0, 1, 3, 2, 4).reshape(b, n, c)
        if permuted:
            x = x[:, torch.argsort(idx)]
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim, heads, groups1, groups2, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, groups1, groups2)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        for i in range(1, 5):
            setattr(self, f"coefficient{i}", Coefficient())

    def forward(self, x, second_loop):
        x = self.coefficient1(x) + self.coefficient2(self.attn(self.norm1(x), second_loop))
        return self.coefficient3(x) + self.coefficient4(self.mlp(self.norm2(x)))


class Mix(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * ratio))
        self.coefficient1, self.coefficient2 = Coefficient(), Coefficient()

    def forward(self, x, second_loop):
        return self.coefficient1(x) + self.coefficient2(self.mlp(self.norm1(x)))


class Stage(nn.Module):
    def __init__(self, dim, heads, depth, unique, groups1, groups2, mlp_ratio, mix_ratio):
        super().__init__()
        blocks = [Block(dim, heads, groups1, groups2, mlp_ratio) for _ in range(unique)]
        loops = depth // unique
        mixes = [Mix(dim, mix_ratio) for _ in range(depth)]
        order = []
        for j in range(unique):
            for loop in range(loops):
                order += [blocks[j], mixes[j * loops + loop]]
        self.blocks = nn.ModuleList(order)  # each shared block listed once per loop

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        for i, layer in enumerate(self.blocks):
            x = layer(x, (i + 2) % 4 == 0)
        return x.transpose(1, 2).reshape(b, c, h, w)


class Pool(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, groups=c_in)

    def forward(self, x):
        return self.conv(x)


class Stem(nn.Module):
    def __init__(self, c_in, c):
        super().__init__()
        widths = [c_in, c // 2, c, c]
        for i in range(3):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1))
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(widths[i + 1]))

    def forward(self, x):
        for i in (1, 2, 3):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return x


class OfficialSReT(nn.Module):
    """SReT-T/LT/S as the official code builds them (depths 4/10/6, unique 2/5/3)."""

    def __init__(self, dims=(64, 128, 256), heads=(2, 4, 8), groups1=(8, 4, 1), groups2=(2, 1, 1),
                 mlp_ratio=3.6, mix_ratio=1.0, image_size=224, num_classes=1000):
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

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed
        for s in range(2):
            x = self.pools[s](self.transformers[s](x))
        x = self.transformers[2](x)
        return self.head(self.norm(x.mean(dim=(2, 3))))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a distinctive random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=gen)
                tensor.copy_(noise.abs() + 0.5 if "running_var" in name else 1 + 0.1 * noise if "coefficient" in name else noise * 0.05)
    return model
