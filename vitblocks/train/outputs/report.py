"""What the trainer draws and shows: the curves plot and the final summary (metrics.csv is
`RunFolder.write_metrics`; TensorBoard and wandb are `vitblocks.train.run.tracking`, when asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitblocks.train.process.extras import import_train_extra


def plot_curves(history: list[dict[str, Any]], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save loss and accuracy curves per epoch as a PNG.

    Args:
        history: Metrics rows.
        path: The PNG file (written as PNG whatever its suffix).
        metadata: Text chunks stored in the PNG.
    """
    import_train_extra("matplotlib").use("Agg")
    plt = import_train_extra("matplotlib.pyplot")

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    acc_ax.plot(epochs, [r["val_top1"] for r in history], label="top-1")
    acc_ax.plot(epochs, [r["val_top5"] for r in history], label="top-5")
    if any(r.get("ema_top1") is not None and r.get("ema_top1") != "" for r in history):
        acc_ax.plot(epochs, [r["ema_top1"] for r in history], label="EMA top-1")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png", metadata=metadata)
    plt.close(fig)


def final_summary(history: list[dict[str, Any]], seconds: float, images: int, files: dict[str, Path]) -> str:
    """The one-screen text printed at the end of a run.

    Args:
        history: Metrics rows.
        seconds: Training time.
        images: Training images processed.
        files: Label -> path of what the run wrote.

    Returns:
        The text.
    """
    best = max(history, key=lambda r: r["val_top1"])
    lines = [
        "",
        "=" * 60,
        f"best top-1   {best['val_top1']:.2f}% (epoch {best['epoch']})",
        f"final top-1  {history[-1]['val_top1']:.2f}%   top-5 {history[-1]['val_top5']:.2f}%",
        f"time         {seconds / 60:.1f} min   ({images / max(seconds, 1e-9):.0f} train img/s)",
    ]
    lines += [f"{name:<12} {path}" for name, path in files.items()]
    lines.append("=" * 60)
    return "\n".join(lines)
