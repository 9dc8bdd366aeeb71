"""A 6-block ViT (unshared) on scikit-learn's bundled digits: the base that recipes/digits_uptrain.py converts.

The quickstart's data and training settings with a plain ViT; about a minute on 2 CPU cores.

    python -m vitblocks.train recipes/digits_vit_base.py
"""

import dataclasses
from pathlib import Path

from vitblocks.train import ModelConfig, load_recipe

VIT = dict(patch_size=4, depth=6, embed_dim=64, num_heads=2, mlp_ratio=2.0)
"""The ViT's shape (timm `vit_tiny_patch16_224` options); the uptraining teacher is built alike."""

config = dataclasses.replace(
    load_recipe(Path(__file__).parent / "quickstart.py"),
    model=ModelConfig("vit_tiny_patch16_224", kwargs=dict(VIT)),
    epochs=20,
    output_dir="runs/digits_vit_base",
)
