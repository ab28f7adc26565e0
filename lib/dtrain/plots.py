"""Figures for evaluation and benchmarks: confusion matrix, worst mistakes, per-class
accuracy, training curves.

Each function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``:
no global figure registry to leak memory in a loop, and no GUI backend needed on a
server (PNG rendering goes through Agg). A notebook still shows the returned figure,
and :func:`png_bytes` turns it into the bytes we write to disk and upload to S3.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

PNG_DPI = 110


def _figure(width: float, height: float) -> Figure:
    # Constrained layout keeps suptitles, colour bars and long class names from overlapping.
    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PNG_DPI, bbox_inches="tight")
    return buffer.getvalue()


def confusion_matrix_figure(matrix: np.ndarray, class_names: Sequence[str],
                            title: str = "Confusion matrix") -> Figure:
    """Heat map of a confusion matrix (rows: true class, columns: predicted class).

    Colours show each row normalised to 1 (the share of that class), so a small
    class is as readable as a big one; the cells print the raw counts.
    """
    matrix = np.asarray(matrix)
    row_totals = matrix.sum(axis=1, keepdims=True)
    shares = matrix / np.maximum(row_totals, 1)
    size = max(5.0, 0.6 * len(class_names) + 2)
    fig = _figure(size + 1, size)
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    for (row, col), count in np.ndenumerate(matrix):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                color="white" if shares[row, col] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    return fig


def mistakes_figure(images: np.ndarray, mistakes: Sequence[dict], class_names: Sequence[str],
                    columns: int = 4, title: str = "Most confident mistakes") -> Figure:
    """Grid of misclassified images, each captioned with its true and predicted label.

    ``images[i]`` is the picture of ``mistakes[i]`` (any shape that squeezes to H×W);
    each mistake is a dict with ``index``, ``true``, ``predicted`` and ``confidence``.
    """
    count = len(mistakes)
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    fig = _figure(2.2 * columns, 2.5 * rows + 0.4)
    fig.suptitle(title)
    if count == 0:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center")
        ax.axis("off")
        return fig
    for slot, (picture, mistake) in enumerate(zip(images, mistakes, strict=True)):
        ax = fig.add_subplot(rows, columns, slot + 1)
        ax.imshow(np.asarray(picture).squeeze(), cmap="gray")
        ax.set_title(f"#{mistake['index']}\ntrue: {class_names[mistake['true']]}\n"
                     f"pred: {class_names[mistake['predicted']]} ({mistake['confidence']:.1%})",
                     fontsize=8)
        ax.axis("off")
    return fig


def per_class_accuracy_figure(accuracies: Sequence[float], class_names: Sequence[str],
                              overall: float | None = None,
                              title: str = "Test accuracy per class") -> Figure:
    """Horizontal bars of accuracy per class, with the overall accuracy as a line."""
    fig = _figure(7, max(3.0, 0.4 * len(class_names) + 1.5))
    ax = fig.add_subplot()
    positions = np.arange(len(class_names))
    bars = ax.barh(positions, accuracies, color="tab:blue")
    ax.bar_label(bars, labels=[f"{a:.1%}" for a in accuracies], padding=3, fontsize=8)
    ax.set_yticks(positions, labels=class_names)
    ax.invert_yaxis()  # first class on top, like the confusion matrix
    ax.set_xlim(0, 1.12)
    if overall is not None:
        ax.axvline(overall, color="tab:red", linestyle="--", label=f"overall {overall:.2%}")
        # Below the axes: inside, it would hide the bars of the last classes.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("accuracy")
    ax.set_title(title)
    return fig


def training_curves_figure(history: Sequence[dict], title: str = "Training curves") -> Figure:
    """Loss (train and test) and test accuracy per epoch, from metrics.json's history."""
    fig = _figure(10, 4)
    fig.suptitle(title)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for key, label in (("train_loss", "train"), ("test_loss", "test")):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            loss_ax.plot(epochs, values, marker="o", label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [row.get("test_accuracy") for row in history], marker="o", color="tab:green")
    acc_ax.set_xlabel("epoch")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    acc_ax.set_ylabel("test accuracy")
    acc_ax.set_title("Test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        # Epochs are whole numbers: no 1.5 ticks on a two-epoch run.
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig
