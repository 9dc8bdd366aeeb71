"""The training loop: one `Trainer` for every model, driven by a `TrainConfig`."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vitblocks.attention import attention_backend
from vitblocks.layers import compile_regions
from vitblocks.models.create import create_model_at_size
import vitblocks.train.checkpoint as ckpt
import vitblocks.train.distributed as distributed
from vitblocks.train.config import ConfigError, TrainConfig, to_dict
from vitblocks.train.data import ResumableSampler, build_dataset, make_loader
from vitblocks.train.distill import DistillationLoss, build_teacher
from vitblocks.train.report import MetricsLog, final_summary, plot_curves


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def create_model(config: TrainConfig) -> nn.Module:
    """Build the configured timm model at the data's resolution and class count.

    Args:
        config: The experiment.

    Returns:
        The model (img_size is passed only to models that take it).
    """
    return create_model_at_size(config.model.name, config.data.img_size,
                                **dict(config.model.kwargs, num_classes=config.data.num_classes))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch generators.

    Args:
        seed: The seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[float]:
    """Count correct predictions at several k.

    Args:
        logits: (B, classes).
        targets: (B,) class indices.
        ks: The k of each top-k.

    Returns:
        For each k, the number of samples whose target is among the top-k predictions.
    """
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hits = top == targets.unsqueeze(-1)
    return [hits[:, :k].any(dim=-1).sum().item() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             autocast: contextlib.AbstractContextManager | None = None,
             runtime: distributed.Runtime | None = None) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (%) of `model` over `loader`.

    Args:
        model: The classifier.
        loader: Batches of (images, labels).
        device: Where to run.
        autocast: Mixed-precision context, if any.
        runtime: When distributed, sums are reduced over all processes.

    Returns:
        `val_loss`, `val_top1` and `val_top5` (%).

    Raises:
        ValueError: If the loader yields no samples.
    """
    model.eval()
    loss, top1, top5, count = 0.0, 0.0, 0.0, 0
    for inputs, targets in loader:
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(inputs)
        loss += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        hits = accuracy(logits, targets)
        top1, top5, count = top1 + hits[0], top5 + hits[1], count + len(targets)
    if runtime is not None:
        loss, top1, top5, count = distributed.all_sum([loss, top1, top5, count], runtime)
    if not count:
        raise ValueError("the validation set is empty")
    return {"val_loss": loss / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count}


class Trainer:
    """Everything one training run needs, built from a config.

    Args:
        config: The experiment.
        output_dir: Overrides `config.output_dir`.

    Example:
        >>> from vitblocks.train import Trainer, load_recipe
        >>> trainer = Trainer(load_recipe("recipes/quickstart.py"))  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, config: TrainConfig, output_dir: str | Path | None = None) -> None:
        self.config = config
        self.runtime = distributed.setup()
        self.output_dir = Path(output_dir or config.output_dir)
        self.device = self.runtime.device
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
        seed_everything(config.seed + self.runtime.rank)

        self.train_set = build_dataset(config, train=True)
        self.val_set = build_dataset(config, train=False)
        data = config.data
        rt = self.runtime
        self.train_sampler = ResumableSampler(len(self.train_set), True, config.seed, rt.rank, rt.world_size,
                                              3 if config.augment.repeated_aug else 1)
        self.val_sampler = ResumableSampler(len(self.val_set), False, config.seed, rt.rank, rt.world_size)
        self.steps_per_epoch = len(self.train_sampler) // data.batch_size
        if self.steps_per_epoch < config.optim.accum_steps:
            raise ConfigError(
                f"the training set gives {self.steps_per_epoch} batches of {data.batch_size} per epoch and process, "
                f"fewer than optim.accum_steps={config.optim.accum_steps}; lower data.batch_size"
            )
        self.updates_per_epoch = self.steps_per_epoch // config.optim.accum_steps

        model = create_model(config).to(self.device)
        if config.model.grad_checkpointing:
            model.set_grad_checkpointing(config.model.grad_checkpointing)
        self.model = model
        global_batch = data.batch_size * config.optim.accum_steps * rt.world_size
        self.lr = config.optim.lr if config.optim.lr is not None else config.optim.lr_per_512 * global_batch / 512
        self.optimizer = create_optimizer_v2(model, config.optim.opt, lr=self.lr, weight_decay=config.optim.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, config.schedule.sched, num_epochs=config.epochs, warmup_epochs=config.schedule.warmup_epochs,
            warmup_lr=config.schedule.warmup_lr, min_lr=config.schedule.min_lr, step_on_epochs=False,
            updates_per_epoch=self.updates_per_epoch,
        )
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay else None
        self.train_model: nn.Module = model
        if rt.distributed:
            self.train_model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if config.model.compile == "regional":
            try:
                compile_regions(model)  # in place, so the DDP wrapper runs the compiled blocks
            except ValueError as error:
                raise ConfigError(f"model.compile='regional': {error} (set model.compile=True)") from None
        elif config.model.compile:
            self.train_model = torch.compile(self.train_model)

        aug = config.augment
        self.mixup = None
        if aug.mixup > 0 or aug.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                               switch_prob=aug.mixup_switch_prob, label_smoothing=aug.label_smoothing,
                               num_classes=data.num_classes)
            base: nn.Module = SoftTargetCrossEntropy()
        elif aug.label_smoothing > 0:
            base = LabelSmoothingCrossEntropy(aug.label_smoothing)
        else:
            base = nn.CrossEntropyLoss()
        teacher = None
        if config.distill.kind != "none":
            teacher = build_teacher(config.distill, data.num_classes, self.device,
                                    allow_random=data.dataset == "synthetic")
        self.criterion = DistillationLoss(base, teacher, config.distill)

        self.epoch, self.batch, self.step = 0, 0, 0
        self.epoch_totals = [0.0, 0, 0]  # loss sum, batches, images of the current epoch so far
        self.history: list[dict[str, Any]] = []
        self.best_top1 = -1.0
        self.last_good_checkpoint: Path | None = None

    # ---- checkpoints -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly.

        Returns:
            Model, optimizer, schedule, scaler and EMA states, position, history, config, RNG.
        """
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_totals": list(self.epoch_totals),
            "best_top1": self.best_top1,
            "history": self.history,
            "config": to_dict(self.config),
            "rng": ckpt.rng_state(),
        }

    def save(self, name: str = "last.pth") -> Path | None:
        """Write a checkpoint atomically (main process only).

        Args:
            name: File name inside the output folder.

        Returns:
            The path written, or None on other processes.
        """
        if not self.runtime.is_main:
            return None
        path = self.output_dir / name
        ckpt.save_atomic(self.state(), path)
        if name == "last.pth":
            self.last_good_checkpoint = path
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by `save`.

        Args:
            path: The checkpoint.

        Raises:
            CheckpointError: If the file is damaged or belongs to a different model.
        """
        state = ckpt.load_training_checkpoint(path)
        saved_model = state["config"]["model"]["name"]
        if saved_model != self.config.model.name:
            raise ckpt.CheckpointError(f"{path} is a checkpoint of {saved_model!r}, not {self.config.model.name!r}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"{path} does not fit this model: {str(error).splitlines()[0]}") from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.epoch_totals = list(state.get("epoch_totals", [0.0, 0, 0]))
        self.best_top1, self.history = state["best_top1"], list(state["history"])
        ckpt.set_rng_state(state["rng"])
        self.last_good_checkpoint = Path(path)

    # ---- steps -------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def on_step_end(self) -> None:
        """Called after every optimizer step; a hook for subclasses."""

    def train_epoch(self, progress: bool) -> dict[str, float]:
        """Run (the rest of) the current epoch.

        Args:
            progress: Show a progress bar.

        Returns:
            Mean training loss of the epoch, throughput, seconds and images seen.

        Raises:
            TrainingDiverged: On a non-finite loss.
        """
        config, accum = self.config, self.config.optim.accum_steps
        self.train_sampler.set_epoch(self.epoch, skip=self.batch * config.data.batch_size)
        loader = make_loader(self.train_set, self.train_sampler, config.data.batch_size, config.data.workers,
                             True, config.seed)
        self.train_model.train()
        if self.batch == 0:
            self.epoch_totals = [0.0, 0, 0]
        start, images = time.perf_counter(), 0
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch + 1}/{config.epochs}",
                   disable=not (progress and self.runtime.is_main), leave=False, dynamic_ncols=True)
        for inputs, targets in loader:
            if self.batch >= self.steps_per_epoch:
                break
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, targets)
            last_of_update = (self.batch + 1) % accum == 0
            sync = contextlib.nullcontext()
            if self.runtime.distributed and not last_of_update:
                sync = self.train_model.no_sync()
            with sync, self._autocast():
                loss = self.criterion(inputs, self.train_model(inputs), targets)
            if not torch.isfinite(loss):
                kept = self.last_good_checkpoint or "none written yet"
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch + 1}); "
                    f"stopped. Last good checkpoint: {kept}. Try a lower optim.lr, optim.clip_grad, or fp32."
                )
            scaled = loss / accum
            if self.scaler:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            self.batch += 1
            images += inputs.shape[0]
            totals = self.epoch_totals
            self.epoch_totals = [totals[0] + loss.item(), totals[1] + 1, totals[2] + inputs.shape[0]]
            if last_of_update:
                self._optimizer_step()
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                                img_s=f"{images * self.runtime.world_size / (time.perf_counter() - start):.0f}")
                every = config.checkpoint.every_steps
                if every and self.step % every == 0 and self.batch < self.steps_per_epoch:
                    self.save()
                self.on_step_end()
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - start
        loss_sum, count = distributed.all_sum(self.epoch_totals[:2], self.runtime)
        images = distributed.all_sum([images], self.runtime)[0]
        return {"train_loss": loss_sum / max(count, 1), "train_img_s": images / max(seconds, 1e-9),
                "seconds": seconds, "images": images}

    def _optimizer_step(self) -> None:
        clip = self.config.optim.clip_grad
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step_update(num_updates=self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Loss, top-1 and top-5 (%) on the validation set, over all processes.

        Args:
            model: The model to evaluate (default: the trained one).

        Returns:
            `val_loss`, `val_top1`, `val_top5`.
        """
        loader = make_loader(self.val_set, self.val_sampler, self.config.data.batch_size, self.config.data.workers,
                             False, self.config.seed)
        return evaluate(model or self.model, loader, self.device, self._autocast(), self.runtime)

    # ---- the run -----------------------------------------------------------------
    def fit(self, progress: bool = True) -> dict[str, Any]:
        """Train to `config.epochs`, evaluating and checkpointing every epoch.

        Args:
            progress: Show a progress bar.

        Returns:
            The last epoch's metrics, with `best_top1` added.

        Raises:
            TrainingDiverged: On a non-finite loss (earlier checkpoints are kept).
        """
        config, main = self.config, self.runtime.is_main
        if main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.output_dir, self.history) if main else None
        start, images = time.perf_counter(), 0
        with attention_backend(config.model.backend):
            while self.epoch < config.epochs:
                train = self.train_epoch(progress)
                if self.runtime.distributed:  # average BatchNorm statistics so every rank evaluates one model
                    distribute_bn(self.model, self.runtime.world_size, reduce=True)
                images += train["images"]
                metrics = self.evaluate()
                row: dict[str, Any] = {"epoch": self.epoch + 1, "train_loss": train["train_loss"], **metrics}
                if self.ema is not None:
                    row["ema_top1"] = self.evaluate(self.ema.module)["val_top1"]
                row.update(lr=self.optimizer.param_groups[0]["lr"], train_img_s=train["train_img_s"],
                           epoch_seconds=train["seconds"])
                self.history.append(row)
                if log is not None:
                    log.history = list(self.history[:-1])
                    log.append(row)
                    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
                self.epoch, self.batch = self.epoch + 1, 0
                improved = row["val_top1"] > self.best_top1
                self.best_top1 = max(self.best_top1, row["val_top1"])
                self.save()
                if improved:
                    self.save("best.pth")
        if main:
            self._finish(time.perf_counter() - start, images)
        return {**self.history[-1], "best_top1": self.best_top1}

    def _finish(self, seconds: float, images: float) -> None:
        from safetensors.torch import save_model

        files = {"checkpoints": self.output_dir / "last.pth", "metrics": self.output_dir / "metrics.csv"}
        save_model(self.model, str(self.output_dir / "model.safetensors"))
        files["weights"] = self.output_dir / "model.safetensors"
        if self.ema is not None:
            save_model(self.ema.module, str(self.output_dir / "model_ema.safetensors"))
            files["EMA weights"] = self.output_dir / "model_ema.safetensors"
        plot_curves(self.history, self.output_dir / "curves.png")
        files["curves"] = self.output_dir / "curves.png"
        print(final_summary(self.history, seconds, int(images), files), file=sys.stdout, flush=True)


def smoke_config(config: TrainConfig, steps: int = 3) -> TrainConfig:
    """The same recipe on synthetic data of its shape, for a few steps on any machine.

    Args:
        config: The recipe's config.
        steps: Optimizer steps to run.

    Returns:
        A one-epoch config on synthetic data, writing to `<output_dir>/smoke`.
    """
    batch = min(config.data.batch_size, 4)
    data = dataclasses.replace(config.data, dataset="synthetic", batch_size=batch, workers=0,
                               synthetic_samples=batch * config.optim.accum_steps * steps)
    precision = config.precision if torch.cuda.is_available() else "fp32"
    return dataclasses.replace(config, data=data, epochs=1, precision=precision,
                               output_dir=str(Path(config.output_dir) / "smoke"), augment=dataclasses.replace(
                                   config.augment, repeated_aug=False),
                               schedule=dataclasses.replace(config.schedule, warmup_epochs=0))

