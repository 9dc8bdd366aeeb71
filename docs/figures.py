"""Figures for the concepts page, drawn from the library's own group and mask code.

    python docs/figures.py [OUT_DIR]      # default: docs/figures

mkdocs runs this through docs/hooks.py before every build.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from vitblocks.attention import TokenGroups  # noqa: E402
from vitblocks.layers import fixed_permutation, inverse_permutation  # noqa: E402


def group_map(side: int, groups: int, permuted: bool) -> torch.Tensor:
    """Group id of every token of a side x side map, as SlicedGroupAttention assigns them."""
    ids = TokenGroups(side * side, groups).group_index()
    if permuted:  # token perm[j] sits at sliced position j
        perm = fixed_permutation(side * side, seed=1)
        ids = ids[inverse_permutation(perm)]
    return ids.view(side, side)


def token_groups_figure() -> plt.Figure:
    """Loop 1: 4 contiguous groups; loop 2: 2 groups of permuted tokens, on a 14x14 map."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (title, groups, permuted) in zip(axes, [("loop 1: 4 groups, raster chunks", 4, False),
                                                    ("loop 2: 2 groups, permuted tokens", 2, True)]):
        ax.imshow(group_map(14, groups, permuted).numpy(), cmap="tab10", vmin=0, vmax=9)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def masks_figure() -> plt.Figure:
    """Allowed attention for 1 class token + 18 tokens in 4 near-equal groups, and one group."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (title, groups) in zip(axes, [("4 groups (sizes 5, 5, 4, 4) + class token", 4),
                                          ("1 group: full attention", 1)]):
        ax.imshow(TokenGroups(18, groups, num_prefix_tokens=1).materialize().numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.tight_layout()
    return fig


FIGURES = {"token_groups.png": token_groups_figure, "attention_masks.png": masks_figure}


def generate(out_dir: str | Path) -> list[Path]:
    """Write every figure to `out_dir`, leaving files whose bytes would not change untouched."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        fig = draw()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, metadata={"Software": None})
        plt.close(fig)
        path = out_dir / name
        if not path.exists() or path.read_bytes() != buffer.getvalue():
            path.write_bytes(buffer.getvalue())
        written.append(path)
    return written


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("figures"))
