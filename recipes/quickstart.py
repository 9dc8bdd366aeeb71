"""A small SReT on scikit-learn's bundled digits: about a minute on 2 CPU cores, >= 95% top-1.

    python -m vitblocks.train recipes/quickstart.py
"""

from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig(
        "sret_t",
        kwargs=dict(
            embed_dims=(32, 64, 128), num_heads=(1, 2, 4), unique_blocks=(1, 1, 1),
            groups=((4, 2), (1,), (1,)), mlp_ratio=2.0, drop_path_rate=0.0,
        ),
    ),
    data=DataConfig(dataset="digits", img_size=32, num_classes=10, batch_size=64, workers=0, val_fraction=0.2,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    augment=AugmentConfig(auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.1),
    optim=OptimConfig(lr=2e-3, weight_decay=0.05),
    schedule=ScheduleConfig(warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5),
    epochs=15,
    output_dir="runs/quickstart",
)
