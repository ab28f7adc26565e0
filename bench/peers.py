"""The recipes the benchmark races: ours and two that tutorials make people copy.

Each recipe is written here from its published description (architecture, optimiser,
schedule, batch size, input scaling), not copied from its source:

* ``pytorch-examples`` — the pytorch/examples MNIST script: conv32-3x3 → conv32→64-3x3
  → max-pool → dropout 0.25 → fc128 → dropout 0.5 → fc10 with log-softmax and NLL loss;
  Adadelta lr 1.0, StepLR γ 0.7 per epoch, batch 64; inputs normalised with MNIST's
  mean/std (0.1307, 0.3081) whatever the dataset, as the script does.
* ``ray-example`` — the Ray Train / KubeRay Fashion-MNIST sample: MLP 784-512-512-10
  with ReLU and dropout 0.25 (and a ReLU after the last layer, which the sample has);
  SGD lr 1e-3 with momentum 0.9, cross-entropy; a global batch of 32 (split across
  workers, so 32 in one process); inputs scaled to [-1, 1] (Normalize(0.5, 0.5)).
* ``ours`` — dtrain.model's recipe (CNN with BatchNorm, AdamW, one-cycle, global batch 256).

Every recipe starts from the same tensors, normalised with the dataset's own mean/std by
dtrain.datasets; ``transform`` maps them to the scaling the recipe published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dtrain import model as ours_model
from dtrain.datasets import NORMALIZATION


@dataclass(frozen=True)
class Recipe:
    """Everything the timed loop needs to train one recipe from scratch."""

    name: str
    build_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    make_scheduler: Callable  # (optimizer, steps_per_epoch, epochs) -> scheduler
    scheduler_per: str  # "step" or "epoch": when the loop calls scheduler.step()
    loss_fn: Callable[[], nn.Module]
    batch_size: int
    transform: Callable[[torch.Tensor], torch.Tensor]
    summary: str


def rescale(dataset: str, mean: float, std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transform from the dataset's normalisation to ``(pixel/255 - mean) / std``."""
    data_mean, data_std = NORMALIZATION[dataset]

    def transform(x: torch.Tensor) -> torch.Tensor:
        return ((x * data_std + data_mean) - mean) / std

    return transform


class ExamplesCNN(nn.Module):
    """The pytorch/examples MNIST network (1.2 M parameters, mostly in fc1)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(128, 10), nn.LogSoftmax(dim=1))

    def forward(self, x):
        return self.classifier(self.features(x))


def pytorch_examples(dataset: str) -> Recipe:
    return Recipe(
        name="pytorch-examples", build_model=ExamplesCNN,
        make_optimizer=lambda m: torch.optim.Adadelta(m.parameters(), lr=1.0),
        make_scheduler=lambda opt, steps, epochs: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7),
        scheduler_per="epoch", loss_fn=nn.NLLLoss, batch_size=64, transform=rescale(dataset, 0.1307, 0.3081),
        summary="CNN conv32-conv64-fc128, Adadelta lr 1.0, StepLR 0.7, batch 64")


class ExampleMLP(nn.Module):
    """The Ray/KubeRay sample's MLP, final ReLU included (it clips negative logits to 0)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, 512), nn.ReLU(), nn.Dropout(0.25), nn.Linear(512, 512), nn.ReLU(),
            nn.Dropout(0.25), nn.Linear(512, 10), nn.ReLU())

    def forward(self, x):
        return self.layers(x)


class _Constant(torch.optim.lr_scheduler.LRScheduler):
    """No schedule: the learning rate stays where the recipe set it."""

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]


def ray_example(dataset: str) -> Recipe:
    return Recipe(
        name="ray-example", build_model=ExampleMLP,
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9),
        make_scheduler=lambda opt, steps, epochs: _Constant(opt), scheduler_per="epoch",
        loss_fn=nn.CrossEntropyLoss, batch_size=32, transform=rescale(dataset, 0.5, 0.5),
        summary="MLP 784-512-512-10, SGD lr 1e-3 momentum 0.9, batch 32")


def ours(dataset: str, config: dict | None = None) -> Recipe:
    cfg = ours_model.model_config(config)
    return Recipe(
        name="ours", build_model=lambda: ours_model.build_model(cfg),
        make_optimizer=lambda m: ours_model.make_optimizer(m, cfg),
        make_scheduler=lambda opt, steps, epochs: ours_model.make_scheduler(opt, cfg, steps, epochs),
        scheduler_per="step", loss_fn=lambda: ours_model.loss_function(cfg), batch_size=cfg["batch_size"],
        transform=lambda x: x,
        summary=(f"CNN-BN conv{cfg['conv1_channels']}-conv{cfg['conv2_channels']}-fc{cfg['hidden']}, "
                 f"AdamW lr {cfg['lr']:g}, one-cycle, batch {cfg['batch_size']}"))


PEERS = {"pytorch-examples": pytorch_examples, "ray-example": ray_example}
