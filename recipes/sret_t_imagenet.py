"""SReT-T on ImageNet-1k with the paper's DeiT-style recipe.

Learning rate 1e-3 per 512 images of global batch with 30 warmup epochs (the authors'
later advice), AdamW (weight decay 0.05, none on 1-D params, biases and the position
map), cosine to 1e-5 over 300 epochs, RandAugment m9-mstd0.5, mixup 0.8, cutmix 1.0,
label smoothing 0.1, random erasing 0.25, repeated augmentation; drop path 0.1 is the
model's own default. `recipes/sret_pit.py` is the same recipe under its older name.

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_t_imagenet.py --set data.root=/data/imagenet
"""

from vitblocks.train import AugmentConfig, DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

config = TrainConfig(
    model=ModelConfig("sret_t"),
    data=DataConfig(dataset="imagefolder", root="data/imagenet", img_size=224, num_classes=1000, batch_size=128,
                    workers=8, crop_pct=0.875),
    augment=AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8, cutmix=1.0,
                          label_smoothing=0.1, repeated_aug=True),
    optim=OptimConfig(opt="adamw", lr=None, lr_per_512=1e-3, weight_decay=0.05),
    schedule=ScheduleConfig(sched="cosine", warmup_epochs=30, warmup_lr=1e-6, min_lr=1e-5),
    epochs=300,
    precision="bf16",
    output_dir="runs/sret_t_imagenet",
)
