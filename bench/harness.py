"""One timed training loop for every recipe, so time-to-target compares like with like.

The clock counts training steps only. Test accuracy is measured several times per epoch
(on the whole 10,000-image test set) with the clock stopped, so "time to 90 %" is the
training time spent until the first evaluation at or above the target — not the time
the benchmark spent measuring. Every recipe sees the same tensors, the same shuffling
generator and the same number of torch threads.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Data:
    """Training and test tensors already in memory (normalised as the dataset module does)."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    load_s: float = 0.0

    def subset(self, train: int, test: int) -> Data:
        """The first ``train``/``test`` examples: smoke runs train on a sliver."""
        return Data(self.name, self.train_x[:train], self.train_y[:train], self.test_x[:test],
                    self.test_y[:test], self.load_s)


@dataclass
class Curve:
    """What one timed run measured. ``points`` are evaluations: training seconds so far
    (evaluation excluded), steps, fractional epoch, test accuracy and loss."""

    name: str
    points: list[dict] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    steps: int = 0
    steps_per_epoch: int = 1
    train_s: float = 0.0
    eval_s: float = 0.0
    stopped: str = "epochs done"

    @property
    def per_epoch_s(self) -> float:
        """Training seconds per epoch from the mean step time (also right for a run cut short)."""
        return self.train_s / max(1, self.steps) * self.steps_per_epoch

    def time_to(self, target: float) -> float | None:
        """Training seconds until the first evaluation at or above ``target`` (None: never)."""
        return next((p["train_s"] for p in self.points if p["accuracy"] >= target), None)

    def accuracy_at(self, seconds: float) -> float | None:
        """Best test accuracy measured within ``seconds`` of training (None: no evaluation yet)."""
        seen = [p["accuracy"] for p in self.points if p["train_s"] <= seconds + 1e-9]
        return max(seen) if seen else None

    def best(self) -> float:
        return max((p["accuracy"] for p in self.points), default=0.0)

    def as_dict(self) -> dict:
        return {"name": self.name, "points": self.points, "epoch_s": [round(s, 3) for s in self.epoch_s],
                "steps": self.steps, "steps_per_epoch": self.steps_per_epoch, "train_s": round(self.train_s, 3),
                "per_epoch_s": round(self.per_epoch_s, 3), "eval_s": round(self.eval_s, 2), "stopped": self.stopped,
                "best_accuracy": self.best()}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on a labelled set, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(x), batch):
        logits = model(x[start:start + batch])
        loss += torch.nn.functional.cross_entropy(logits, y[start:start + batch], reduction="sum").item()
        correct += (logits.argmax(1) == y[start:start + batch]).sum().item()
    model.train(was_training)
    return correct / max(1, len(x)), loss / max(1, len(x))


def eval_steps(steps_per_epoch: int, evals_per_epoch: int) -> set[int]:
    """The 1-based step numbers within an epoch after which to evaluate (always the last)."""
    every = max(1, math.ceil(steps_per_epoch / max(1, evals_per_epoch)))
    return set(range(every, steps_per_epoch, every)) | {steps_per_epoch}


def train_timed(recipe, data: Data, epochs: int, evals_per_epoch: int = 4, time_cap_s: float | None = None,
                target: float | None = None, stop_at_target: bool = False, seed: int = 0) -> Curve:
    """Train ``recipe`` (see peers.Recipe) for ``epochs`` with periodic evaluation.

    Stops early when the training clock passes ``time_cap_s`` (after one last evaluation)
    or, with ``stop_at_target``, at the first evaluation reaching ``target``.
    """
    torch.manual_seed(seed)
    train_x, test_x = recipe.transform(data.train_x), recipe.transform(data.test_x)
    model = recipe.build_model()
    optimizer = recipe.make_optimizer(model)
    batch = recipe.batch_size
    steps_per_epoch = math.ceil(len(train_x) / batch)
    scheduler = recipe.make_scheduler(optimizer, steps_per_epoch, epochs)
    loss_fn = recipe.loss_fn()
    shuffle = torch.Generator().manual_seed(seed)
    checkpoints = eval_steps(steps_per_epoch, evals_per_epoch)
    curve, clock = Curve(recipe.name, steps_per_epoch=steps_per_epoch), 0.0

    def evaluate(epoch: int, step: int) -> float:
        started = time.perf_counter()
        acc, loss = accuracy(model, test_x, data.test_y)
        curve.eval_s += time.perf_counter() - started
        curve.points.append({"train_s": round(clock, 3), "step": curve.steps, "epoch": round(epoch + step / steps_per_epoch, 3),
                             "accuracy": round(acc, 4), "loss": round(loss, 4)})
        return acc

    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=shuffle)
        epoch_started = clock  # epoch_s lists whole epochs only; per_epoch_s covers cut runs
        for step in range(1, steps_per_epoch + 1):
            started = time.perf_counter()
            idx = order[(step - 1) * batch:step * batch]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(train_x[idx]), data.train_y[idx]).backward()
            optimizer.step()
            if recipe.scheduler_per == "step":
                scheduler.step()
            clock += time.perf_counter() - started
            curve.steps, curve.train_s = curve.steps + 1, clock
            over_time = time_cap_s is not None and clock >= time_cap_s
            if step in checkpoints or over_time:
                acc = evaluate(epoch, step)
                if stop_at_target and target is not None and acc >= target:
                    curve.stopped = f"reached {target:.0%}"
                    return curve
                if over_time:
                    curve.stopped = f"time cap {time_cap_s:.0f} s"
                    return curve
        curve.epoch_s.append(clock - epoch_started)
        if recipe.scheduler_per == "epoch":
            scheduler.step()
    return curve

