"""SReT-T with early exit of whole images, on ImageNet-1k.

After every block application of the last stage but the last (positions 0-4 of its 6),
the model's own head scores the image; training adds a loss at each exit (half the
weight of the final output's, shared among them). At evaluation an image stops once its
top softmax probability reaches the threshold, and the rest of the batch runs on:

    torchrun --nproc_per_node 8 -m vitblocks.train recipes/sret_t_exit.py --set data.root=/data/imagenet
    python -m vitblocks.eval runs/sret_t_exit_imagenet/best.pth --exit-threshold 0.9

The paper's recipe of recipes/sret_t_imagenet.py otherwise.
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

config = derive(load_recipe(Path(__file__).parent / "sret_t_imagenet.py"),
                model={"kwargs": {"early_exit": {"weight": 0.5}}},
                output_dir="runs/sret_t_exit_imagenet")
