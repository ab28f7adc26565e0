"""The classifier and its training recipe.

A small CNN (conv24-5x5 → conv32-3x3 → fc256) with BatchNorm, trained with AdamW under a
one-cycle learning-rate schedule. On 2 CPU cores it does an epoch of the 60,000 training
images in well under 10 s and reaches ≥ 90 % on Fashion-MNIST after 2 epochs (≥ 99 % on
MNIST). The whole architecture is described by a plain dict — the same dict is saved as
``config.json`` next to ``model.pt`` — so the evaluator can rebuild the exact network
without importing the training code's defaults.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 28, 28)

# Every key the network and the recipe read, with its default. ``model_config`` fills
# the gaps so an old config.json keeps loading after a default changes.
DEFAULT_CONFIG: dict = {
    "arch": "cnn-bn",
    "conv1_channels": 24,
    "conv2_channels": 32,
    "hidden": 256,
    "dropout": 0.25,
    "num_classes": NUM_CLASSES,
    # Recipe. The batch size is global: each of N workers takes batch_size / N, so 2
    # and 8 workers follow the same optimisation path (up to BatchNorm statistics).
    "batch_size": 256,
    "lr": 4e-3,
    "weight_decay": 5e-4,
    "label_smoothing": 0.05,
    "seed": 42,
}

MODEL_KEYS = ("arch", "conv1_channels", "conv2_channels", "hidden", "dropout", "num_classes")


def model_config(config: dict | None = None) -> dict:
    """The defaults overlaid with ``config`` (unknown keys are kept, for the caller)."""
    return {**DEFAULT_CONFIG, **(config or {})}


def architecture(config: dict) -> dict:
    """Only the keys that define the network: what ``config.json`` needs to rebuild it."""
    merged = model_config(config)
    return {key: merged[key] for key in MODEL_KEYS}


class SmallCNN(nn.Sequential):
    """28×28 grey image → 10 logits. Two conv blocks halve the image twice (28→14→7)."""

    def __init__(self, conv1: int, conv2: int, hidden: int, dropout: float, num_classes: int):
        super().__init__(
            # Pooling before BatchNorm: BN and ReLU then touch a quarter of the pixels,
            # which makes a training step about 20 % faster on CPU at the same accuracy.
            nn.Conv2d(1, conv1, kernel_size=5, padding=2, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(conv1),
            nn.ReLU(inplace=True),
            nn.Conv2d(conv1, conv2, kernel_size=3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(conv2),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(conv2 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


def build_model(config: dict | None = None) -> nn.Module:
    """The network described by ``config`` (see DEFAULT_CONFIG); weights are random."""
    cfg = model_config(config)
    if cfg["arch"] != "cnn-bn":
        raise ValueError(f"unknown model arch {cfg['arch']!r} (known: cnn-bn)")
    return SmallCNN(cfg["conv1_channels"], cfg["conv2_channels"], cfg["hidden"],
                    cfg["dropout"], cfg["num_classes"])


def make_optimizer(model: nn.Module, config: dict) -> torch.optim.Optimizer:
    """AdamW; no weight decay on BatchNorm and bias parameters (decaying them only hurts)."""
    cfg = model_config(config)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["lr"])


MIN_ONE_CYCLE_STEPS = 16


def make_scheduler(optimizer: torch.optim.Optimizer, config: dict, steps_per_epoch: int,
                   epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One-cycle schedule over the whole run, stepped once per batch.

    Warm-up then cosine decay to nearly zero is what makes a 2-epoch run land
    reliably above 90 %: the last steps average out the noise of a high learning rate.
    """
    cfg = model_config(config)
    total = steps_per_epoch * epochs
    if total < MIN_ONE_CYCLE_STEPS:
        # OneCycleLR divides by its phase lengths, which round to zero on a handful of steps
        # (4 steps: ZeroDivisionError). Such tiny runs (smoke tests) keep a constant rate.
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg["lr"], total_steps=total, pct_start=0.25, div_factor=10.0,
        final_div_factor=100.0)


def loss_function(config: dict) -> nn.Module:
    """Cross-entropy with a little label smoothing (steadier with a high learning rate)."""
    return nn.CrossEntropyLoss(label_smoothing=model_config(config)["label_smoothing"])


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1024) -> dict:
    """Mean cross-entropy (no smoothing) and accuracy of ``model`` on a labelled set."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        logits = model(x)
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    count = max(1, len(images))
    return {"loss": total_loss / count, "accuracy": correct / count, "count": len(images)}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities (N×10, on the CPU) for a batch of normalised images."""
    model.eval()
    device = next(model.parameters()).device
    chunks = [torch.softmax(model(images[i:i + batch_size].to(device)), dim=1).cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, NUM_CLASSES)
