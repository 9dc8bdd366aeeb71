"""Convert the digits ViT of recipes/digits_vit_base.py to 3 shared blocks with per-loop LoRA, then distill.

The 6 blocks become 3 unique blocks cycled twice (A B C A B C), initialised stepwise from
the base's layers, with rank-4 per-loop LoRA set from the SVD of what each layer differs
by; a few epochs of distillation from the base (the teacher) recover the accuracy. Train
the base first:

    python -m vitblocks.train recipes/digits_vit_base.py
    python -m vitblocks.train recipes/digits_uptrain.py
    python -m vitblocks.eval runs/digits_uptrain/best.pth --loops 3    # test-time depth

`python -m benchmarks.sharing_digits` runs every init and rank of this recipe (the table
in docs/sharing.md).
"""

from pathlib import Path

from vitblocks.train import derive, load_recipe

BASE = "runs/digits_vit_base/best.pth"

base = load_recipe(Path(__file__).parent / "digits_vit_base.py")
config = derive(
    base,
    model={"convert": {"base_checkpoint": BASE, "share": "cycle", "loops": 2, "init": "stepwise", "rank": 4}},
    distill={"kind": "soft", "teacher": base.model.name, "teacher_checkpoint": BASE,
             "teacher_kwargs": dict(base.model.kwargs, img_size=base.data.img_size)},
    optim={"lr": 5e-4},
    schedule={"warmup_epochs": 0},
    epochs=5,
    output_dir="runs/digits_uptrain",
)
