import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from train_helpers import tiny_config
from vitblocks.eval import run as evaluate_checkpoint
from vitblocks.io import CheckpointError
from vitblocks.train import ConfigError, DistillConfig, Trainer
from vitblocks.train.config.schema import AugmentConfig, DataConfig
from vitblocks.train.data.datasets import build_dataset, check_image_folder, eval_transform
from vitblocks.train.errors import DataError
from vitblocks.train.run.distill import DistillationLoss, hard_distillation_loss, soft_distillation_loss

pytestmark = pytest.mark.slow  # trains or starts processes: left out of the quick subset


def make_image_folder(root, classes=3, per_class=8, size=40):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (rng.random((size, size, 3)) * 80 + c * 80).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def image_folder_config(tmp_path, augment):
    make_image_folder(tmp_path / "data")
    data = DataConfig(dataset="imagefolder", root=str(tmp_path / "data"), img_size=32, num_classes=3, batch_size=4,
                      workers=0)
    return tiny_config(tmp_path / "run", epochs=1, data=data, augment=augment)


def test_soft_distillation_is_cross_entropy_with_teacher_soft_labels():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    expected = -(F.softmax(teacher / 2, -1) * F.log_softmax(student / 2, -1)).sum(-1).mean()
    torch.testing.assert_close(soft_distillation_loss(student, teacher, 2.0), expected)
    # unlike a KL divergence it is not zero when student == teacher: it is the teacher's entropy
    assert soft_distillation_loss(teacher, teacher) > 0


def test_hard_distillation_mixes_base_loss_and_teacher_argmax():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    base = torch.tensor(1.5)
    expected = 0.5 * base + 0.5 * F.cross_entropy(student, teacher.argmax(-1))
    torch.testing.assert_close(hard_distillation_loss(base, student, teacher), expected)


class _Spy(torch.nn.Module):
    """A teacher that records what it was given."""

    pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def forward(self, images):
        self.seen = images
        return images.mean(dim=(2, 3)).repeat(1, 4)[:, :10]


@pytest.mark.parametrize("pretrained", [True, False])
def test_teacher_with_timm_weights_gets_images_normalized_as_its_cfg_says(pretrained):
    from timm.task.distillation import DistillationTeacher

    imagenet_mean, imagenet_std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = DistillationTeacher(_Spy())
    config = DistillConfig(kind="soft", teacher="spy", teacher_kwargs={"pretrained": pretrained})
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, config, imagenet_mean, imagenet_std)
    images = torch.randn(2, 3, 4, 4)
    loss(images, torch.randn(2, 10), torch.tensor([1, 2]))
    mean, std = torch.tensor(imagenet_mean).view(1, 3, 1, 1), torch.tensor(imagenet_std).view(1, 3, 1, 1)
    pixels = images * std + mean
    expected = (pixels - 0.5) / 0.5 if pretrained else images  # a checkpoint trained here sees the student's input
    torch.testing.assert_close(teacher.model.seen, expected)


def test_teacher_is_frozen_in_eval_mode_and_outside_the_student_state(tmp_path):
    config = tiny_config(tmp_path, distill=DistillConfig(kind="soft", teacher="resnet18"))
    trainer = Trainer(config)
    teacher = trainer.criterion.teacher[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not any(k.startswith("teacher") for k in trainer.criterion.state_dict())
    trainer.fit(progress=False)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_loads_a_local_checkpoint_and_refuses_random_or_mismatched_weights(tmp_path):
    import timm

    weights = timm.create_model("resnet18", num_classes=4).state_dict()
    torch.save(weights, tmp_path / "teacher.pth")
    config = tiny_config(tmp_path, distill=DistillConfig(kind="hard", teacher="resnet18",
                                                         teacher_checkpoint=str(tmp_path / "teacher.pth")))
    teacher = Trainer(config).criterion.teacher[0]
    torch.testing.assert_close(teacher.model.fc.weight, weights["fc.weight"])
    config.data.num_classes = 7
    with pytest.raises(CheckpointError, match="does not fit the teacher 'resnet18'"):
        Trainer(config)
    config.distill.teacher_checkpoint = None
    config.data.dataset = "digits"
    config.data.num_classes = 10
    with pytest.raises(ConfigError, match="random weights"):
        Trainer(config)


def test_distillation_loss_without_teacher_is_the_base_loss():
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), None, DistillConfig())
    logits, targets = torch.randn(3, 5), torch.tensor([0, 2, 4])
    torch.testing.assert_close(loss(torch.zeros(3), logits, targets), F.cross_entropy(logits, targets))


def test_image_folder_training_with_timm_augmentation(tmp_path):
    config = image_folder_config(tmp_path, AugmentConfig(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, mixup=0.8,
                                                         cutmix=1.0, label_smoothing=0.1, repeated_aug=True))
    dataset = build_dataset(config, train=True)
    names = " ".join(type(t).__name__ for t in dataset.transform.transforms)
    assert "RandAugment" in names and "RandomResizedCrop" in names and "RandomErasing" not in names
    assert dataset[0][0].dtype == torch.uint8  # workers send uint8; erasing runs on the device
    trainer = Trainer(config)
    assert trainer.data.train_sampler.repeats == 3
    assert trainer.data.train_loader(trainer.device).random_erasing.probability == 0.25
    trainer.fit(progress=False)


def test_eval_protocol_resizes_then_center_crops():
    steps = eval_transform(DataConfig(img_size=224, crop_pct=0.875)).transforms
    resize, crop = steps[0], steps[1]
    assert type(resize).__name__ == "Resize" and resize.size == 256
    assert type(crop).__name__ == "CenterCrop" and tuple(crop.size) == (224, 224)


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images"])
def test_bad_image_folders_explain_the_layout(tmp_path, layout):
    if layout != "missing":
        (tmp_path / "train").mkdir()
    if layout == "no_images":
        (tmp_path / "train" / "cat").mkdir()
        (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/<class name>/<image>\.jpg"):
        check_image_folder(tmp_path, "train")


def test_eval_command_reproduces_the_trainers_validation_accuracy(tmp_path, capsys):
    config = image_folder_config(tmp_path, AugmentConfig(auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0))
    result = Trainer(config).fit(progress=False)
    metrics = evaluate_checkpoint(str(tmp_path / "run" / "last.pth"))
    assert metrics["val_top1"] == pytest.approx(result["val_top1"])
    out = subprocess.run([sys.executable, "-m", "vitblocks.eval", str(tmp_path / "run" / "last.pth"),
                          "--data", str(tmp_path / "data")], capture_output=True, text=True)
    assert out.returncode == 0 and f"top-1 {result['val_top1']:.2f}%" in out.stdout
    from vitblocks.eval import main as eval_main

    capsys.readouterr()
    assert eval_main([str(tmp_path / "nope.pth")]) == 2 and "no checkpoint at" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["recipes/sret_pit.py", "recipes/sret_t_distill.py", "recipes/deit_tiny_rec.py",
                                    "recipes/digits_uptrain.py"])
def test_smoke_runs_a_recipe_on_synthetic_data(tmp_path, recipe):
    argv = [recipe, "--smoke", "--no-progress", "--output-dir", str(tmp_path)]
    if recipe.endswith("sret_pit.py"):  # the real command line once; the entry point in this process otherwise
        result = subprocess.run([sys.executable, "-m", "vitblocks.train", *argv], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        from vitblocks.train.__main__ import main

        assert main(argv) == 0
    assert (tmp_path / "smoke" / "model.safetensors").is_file()
