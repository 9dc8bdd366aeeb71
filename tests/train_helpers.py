"""Small, fast training configs for tests."""

from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

TINY_SRET = dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1),
                 groups=((4, 2), (1,), (1,)), mlp_ratio=2.0, drop_path_rate=0.1)


def tiny_config(output_dir, **overrides) -> TrainConfig:
    values = dict(
        model=ModelConfig("sret_t", kwargs=dict(TINY_SRET)),
        data=DataConfig(dataset="synthetic", img_size=32, num_classes=4, batch_size=8, workers=0,
                        synthetic_samples=48),
        augment=AugmentConfig(auto_augment=None, re_prob=0.0, mixup=0.8, cutmix=1.0, label_smoothing=0.1),
        optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(warmup_epochs=1),
        epochs=2,
        output_dir=str(output_dir),
    )
    values.update(overrides)
    return TrainConfig(**values)


def doubled_batch_config(output_dir, batch_size) -> TrainConfig:
    """A run with no randomness beyond the data order and no BatchNorm (a tiny recursive ViT whose second
    loop updates the half of the tokens its routers pick: DDP with routers), 2 batches per update: two
    processes at `batch_size` and one at twice it compute the same updates."""
    return TrainConfig(
        model=ModelConfig("deit_tiny_rec_patch16_224", kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                                    routing={"capacity": 0.5})),
        data=DataConfig(dataset="synthetic", img_size=32, num_classes=4, batch_size=batch_size, workers=0,
                        synthetic_samples=64),
        augment=AugmentConfig(auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0),
        optim=OptimConfig(lr=1e-3, accum_steps=2), schedule=ScheduleConfig(warmup_epochs=0), epochs=1,
        output_dir=str(output_dir))


TINY_RECIPE = '''
from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig("sret_t", kwargs=dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1),
                                            groups=((4, 2), (1,), (1,)), mlp_ratio=2.0)),
    data=DataConfig(dataset="synthetic", img_size=32, num_classes=4, batch_size=8, workers=0, synthetic_samples=32),
    augment=AugmentConfig(auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0),
    optim=OptimConfig(lr=1e-3),
    schedule=ScheduleConfig(warmup_epochs=1),
    epochs=1,
    output_dir={output_dir!r},
)
'''


def write_tiny_recipe(folder, output_dir) -> str:
    """A recipe file of a tiny synthetic run (seconds on a CPU), for command-line tests."""
    path = folder / "tiny_recipe.py"
    path.write_text(TINY_RECIPE.format(output_dir=str(output_dir)))
    return str(path)


def run_cli(*args, cwd=None):
    """Run `python -m ARGS...`; return the completed process (text output)."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def assert_clear_error(result, *fragments):
    """A command that failed with exit code 2, a message holding every fragment, and no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def write_digit_folder(root, classes=("c1", "c2", "c10"), train_per_class=6, val_per_class=2, size=16):
    """A tiny ImageFolder of scikit-learn's digits as PNGs: class i holds images of digit i.

    The class names sort differently as plain strings (c1, c10, c2) and naturally (c1, c2, c10).
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits, root = load_digits(), Path(root)
    for label, name in enumerate(classes):
        images = digits.images[digits.target == label]
        for split, start, count in (("train", 0, train_per_class), ("val", train_per_class, val_per_class)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = (images[start + i] * 255 / 16).astype(np.uint8)
                Image.fromarray(pixels).resize((size, size)).convert("RGB").save(folder / f"{i}.png")
    return root


FOLDER_RECIPE = '''
from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig("sret_t", kwargs=dict(embed_dims=(16, 32, 64), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1),
                                            groups=((4, 2), (1,), (1,)), mlp_ratio=2.0, drop_path_rate=0.1)),
    data=DataConfig(dataset="imagefolder", root={root!r}, img_size=32, num_classes=3, batch_size=3,
                    workers={workers}),
    augment=AugmentConfig(auto_augment=None, re_prob={re_prob}, mixup=0.0, cutmix=0.0),
    optim=OptimConfig(lr=1e-3),
    schedule=ScheduleConfig(warmup_epochs=1),
    epochs=2,
    output_dir={output_dir!r},
)
'''


def write_folder_recipe(path, root, output_dir, workers=2, re_prob=0.25) -> str:
    """A recipe of a tiny ImageFolder run (6 steps an epoch, 2 epochs) with loader workers."""
    path.write_text(FOLDER_RECIPE.format(root=str(root), output_dir=str(output_dir), workers=workers,
                                         re_prob=re_prob))
    return str(path)
