"""Distillation losses and the teacher model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.task.distillation import DistillationTeacher
from torch import nn

from vitblocks.train.config.schema import DistillConfig


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
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


def build_teacher(config: DistillConfig, num_classes: int, device: torch.device,
                  allow_random: bool = False) -> nn.Module:
    """The frozen teacher: a timm model, with local weights when a checkpoint is given.

    Args:
        config: Teacher name, checkpoint and options.
        num_classes: Classes of the task.
        device: Where the teacher runs.
        allow_random: Accept a teacher without trained weights (smoke tests only).

    Returns:
        The teacher, frozen, in eval mode, wrapped in timm's `DistillationTeacher` (which
        knows the normalization the teacher's pretrained cfg expects).

    Raises:
        FileNotFoundError: If `teacher_checkpoint` names a missing file.
        CheckpointError: If the checkpoint does not fit the teacher.
        ConfigError: If the teacher would have no trained weights.
    """
    import timm

    from vitblocks.io import CheckpointError, read_checkpoint
    from vitblocks.train.errors import ConfigError

    if not (config.teacher_checkpoint or config.teacher_kwargs.get("pretrained") or allow_random):
        raise ConfigError(
            f"the teacher {config.teacher!r} would have random weights: "
            "set distill.teacher_checkpoint=/path/to/weights "
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
    return DistillationTeacher(teacher.to(device), device=device).eval()


class DistillationLoss(nn.Module):
    """Wraps the base criterion with the configured distillation term.

    Images reach the teacher normalized as it expects: a teacher with timm's pretrained
    weights (`distill.teacher_kwargs.pretrained=True`) gets them re-normalized from the
    data's mean/std to its pretrained cfg's (timm's `DistillationTeacher.normalize_input`);
    a teacher loaded from `distill.teacher_checkpoint` was trained here and sees them as
    the student does.

    Args:
        base: Loss on the (possibly mixed) labels.
        teacher: Frozen teacher, or None for no distillation.
        config: Kind, temperature and alpha.
        data_mean: The data's normalization mean, per channel.
        data_std: The data's normalization std, per channel.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module | None, config: DistillConfig,
                 data_mean: Sequence[float] | None = None, data_std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.base, self.config = base, config
        self.teacher = [teacher]  # a list keeps the teacher out of state_dict and .parameters()
        renormalize = isinstance(teacher, DistillationTeacher) and bool(config.teacher_kwargs.get("pretrained"))
        self.student_norm = None
        if renormalize and data_mean is not None and data_std is not None:
            device = teacher.mean_kd.device
            self.student_norm = (torch.tensor(data_mean, device=device).view(1, -1, 1, 1),
                                 torch.tensor(data_std, device=device).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss for one batch."""
        teacher = self.teacher[0]
        if teacher is None or self.config.kind == "none":
            return self.base(logits, targets)
        with torch.no_grad():
            if self.student_norm is not None:
                images = teacher.normalize_input(images, *self.student_norm)
            teacher_logits = teacher(images)
        if self.config.kind == "soft":
            return soft_distillation_loss(logits, teacher_logits, self.config.temperature)
        return hard_distillation_loss(self.base(logits, targets), logits, teacher_logits, self.config.alpha)
