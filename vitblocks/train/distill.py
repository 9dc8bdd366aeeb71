"""Distillation losses and the teacher model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitblocks.train.config import DistillConfig


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """SReT's soft-label loss: batch mean of -sum softmax(t/T) * log_softmax(s/T).

    Unlike timm's `TokenDistillationTask` (KL with `batchmean` scaled by T^2) there is
    no extra factor: this is the cross-entropy against the teacher's soft labels.

    Args:
        student_logits: (B, classes).
        teacher_logits: (B, classes).
        temperature: Softmax temperature T.

    Returns:
        The scalar loss.
    """
    targets = F.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(targets * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1).mean()


def hard_distillation_loss(base_loss: torch.Tensor, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           alpha: float = 0.5) -> torch.Tensor:
    """DeiT's hard distillation: (1 - alpha) * base loss + alpha * CE(student, teacher's top class).

    Args:
        base_loss: Loss on the true (possibly mixed) labels.
        student_logits: (B, classes).
        teacher_logits: (B, classes).
        alpha: Weight of the teacher term.

    Returns:
        The scalar loss.
    """
    return (1 - alpha) * base_loss + alpha * F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


def build_teacher(config: DistillConfig, num_classes: int, device: torch.device, allow_random: bool = False) -> nn.Module:
    """The frozen teacher: a timm model, with local weights when a checkpoint is given.

    Args:
        config: Teacher name, checkpoint and options.
        num_classes: Classes of the task.
        device: Where the teacher runs.
        allow_random: Accept a teacher without trained weights (smoke tests only).

    Returns:
        The teacher, frozen, in eval mode.

    Raises:
        FileNotFoundError: If `teacher_checkpoint` names a missing file.
        CheckpointError: If the checkpoint does not fit the teacher.
        ConfigError: If the teacher would have no trained weights.
    """
    import timm

    from vitblocks.io import CheckpointError, read_checkpoint
    from vitblocks.train.config import ConfigError

    if not (config.teacher_checkpoint or config.teacher_kwargs.get("pretrained") or allow_random):
        raise ConfigError(
            f"the teacher {config.teacher!r} would have random weights: set distill.teacher_checkpoint=/path/to/weights "
            "(or distill.teacher_kwargs.pretrained=True where timm can download them)"
        )

    teacher = timm.create_model(config.teacher, num_classes=num_classes, **config.teacher_kwargs)
    if config.teacher_checkpoint:
        try:
            teacher.load_state_dict(read_checkpoint(config.teacher_checkpoint))
        except RuntimeError as error:
            raise CheckpointError(
                f"{config.teacher_checkpoint} does not fit the teacher {config.teacher!r} with {num_classes} classes: "
                f"{str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}"
            ) from error
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


class DistillationLoss(nn.Module):
    """Wraps the base criterion with the configured distillation term.

    Args:
        base: Loss on the (possibly mixed) labels.
        teacher: Frozen teacher, or None for no distillation.
        config: Kind, temperature and alpha.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None, config: DistillConfig) -> None:
        super().__init__()
        self.base, self.config = base, config
        self.teacher = [teacher]  # a list keeps the teacher out of state_dict and .parameters()

    def forward(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss for one batch."""
        teacher = self.teacher[0]
        if teacher is None or self.config.kind == "none":
            return self.base(logits, targets)
        with torch.no_grad():
            teacher_logits = teacher(images)
        if self.config.kind == "soft":
            return soft_distillation_loss(logits, teacher_logits, self.config.temperature)
        return hard_distillation_loss(self.base(logits, targets), logits, teacher_logits, self.config.alpha)
