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
