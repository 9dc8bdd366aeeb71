"""The official SReT computation, for checkpoint tests.

`benchmarks.naive_sret.NaiveSReT` follows the official code's parameter layout (spec
section 4) and forward pass (sections 1-3), so checkpoints written from it are real
official-layout checkpoints and its outputs are the reference; the benchmarks time the
same class as their naive baseline.
"""

import torch
from torch import nn

from benchmarks.naive_sret import NaiveSReT as OfficialSReT

__all__ = ["OfficialSReT", "randomize_"]


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and BN statistic a distinctive random value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=gen)
                tensor.copy_(noise.abs() + 0.5 if "running_var" in name
                             else 1 + 0.1 * noise if "coefficient" in name else noise * 0.05)
    return model
