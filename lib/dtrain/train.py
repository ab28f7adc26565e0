"""The training job: the per-worker loop Ray Train runs, and the same loop without Ray.

Each worker reads the dataset from MinIO, trains on its shard (a rank-strided slice of
one shared shuffle per epoch, like ``DistributedSampler``), evaluates its slice of the
test set, and reports once per epoch. Rank 0 attaches a checkpoint to every report, so
a restarted run resumes from the last finished epoch and Train V2's ``Result`` carries
metrics. The global batch is fixed: each of N workers takes ``batch_size / N``, so a
2-worker and an 8-worker run follow the same recipe.

The driver side (``driver_main``: checks, ``TorchTrainer.fit()``, publishing the model)
is in :mod:`dtrain.driver`; the submitter (Jobs API) in :mod:`dtrain.submit`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dtrain import model as model_lib
from dtrain.errors import TrainingError

CHECKPOINT_FILE = "checkpoint.pt"
# Rank 0 prints these markers; the submitter parses them from the job's log stream.
EPOCH_MARKER = "DTRAIN_EPOCH"
FIRST_STEP_MARKER = "DTRAIN_FIRST_STEP"
RESULT_MARKER = "DTRAIN_RESULT"

# Everything a run reads, with defaults. The model/recipe keys come from model.py.
RUN_DEFAULTS: dict = {
    **model_lib.DEFAULT_CONFIG,
    "dataset": "fashion-mnist",
    "epochs": 2,
    "workers": 2,
    "cpus_per_worker": 1,
    "train_samples": None,  # first N training images only (tests); None = all
    "test_samples": None,
    "max_failures": 2,
    # Test hook: the last rank exits hard half-way through this (1-based) epoch, on the
    # first attempt only, to prove that a restarted run resumes from its checkpoint.
    "fail_at_epoch": None,
}


def run_config(overrides: dict | None = None) -> dict:
    """RUN_DEFAULTS overlaid with ``overrides`` (None values are ignored), validated."""
    cfg = {**RUN_DEFAULTS, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    for key in ("epochs", "workers", "cpus_per_worker", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise TrainingError(f"{key.replace('_', '-')} must be a whole number ≥ 1, got {cfg[key]!r}")
    if cfg["batch_size"] < cfg["workers"]:
        raise TrainingError(f"batch-size {cfg['batch_size']} is smaller than workers {cfg['workers']}: "
                            "each worker needs at least one sample per step")
    if not cfg["lr"] > 0:
        raise TrainingError(f"lr must be > 0, got {cfg['lr']!r}")
    if cfg["fail_at_epoch"] is not None and not 2 <= cfg["fail_at_epoch"] <= cfg["epochs"]:
        # Epoch 1 cannot be used: "first attempt" is recognised by the absence of a
        # checkpoint, and there is none before epoch 1 ends.
        raise TrainingError(f"fail_at_epoch must be between 2 and epochs ({cfg['epochs']}), "
                            f"got {cfg['fail_at_epoch']}")
    cfg["dataset"] = resolve_dataset(cfg["dataset"])
    return cfg


def resolve_dataset(name: str) -> str:
    """A known dataset name; 'auto' means the first one published in the bucket."""
    from dtrain import datasets

    if name != "auto":
        return datasets.check_name(name)
    available = datasets.published()
    if not available:
        raise TrainingError("dataset 'auto': no dataset in the bucket; run 'dtrain data prepare'")
    return available[0]


def driver_command(dataset: str, workers: int, epochs: int, run_id: str | None = None, cpus_per_worker: int = 1,
                   batch_size: int = RUN_DEFAULTS["batch_size"], lr: float | None = None,
                   extra: dict | None = None, python: str = "python") -> list[str]:
    """The Ray job entrypoint: the same list for the Jobs API and the RayJob manifest.
    ``extra`` (tests, benchmarks) overrides other RUN_DEFAULTS keys, e.g. train_samples.
    Without ``run_id`` the driver names the run itself (a RayJob applied twice gets two runs)."""
    cmd = [python, "-m", "dtrain", "train", "--driver", "--dataset", dataset, "--workers", str(workers),
           "--epochs", str(epochs), *(["--run-id", run_id] if run_id else []),
           "--cpus-per-worker", str(cpus_per_worker), "--batch-size", str(batch_size)]
    cmd += ["--lr", repr(float(lr))] if lr is not None else []
    return cmd + (["--extra-config", json.dumps(check_extra(extra), sort_keys=True)] if extra else [])


def check_extra(extra: dict | str | None) -> dict:
    """Extra run settings (a dict or its JSON): only known RUN_DEFAULTS keys."""
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise TrainingError(f"--extra-config is not valid JSON: {exc}") from None
    if not isinstance(extra or {}, dict):
        raise TrainingError("--extra-config must be a JSON object")
    unknown = sorted(set(extra or {}) - set(RUN_DEFAULTS))
    if unknown:
        raise TrainingError(f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(RUN_DEFAULTS))}")
    return dict(extra or {})


# --- where a worker runs ---------------------------------------------------------------------
@dataclass
class WorkerContext:
    """Who this process is in the run, and how it talks to the others."""

    rank: int = 0
    world_size: int = 1
    in_ray: bool = False

    @property
    def distributed(self) -> bool:
        import torch.distributed as dist

        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all workers (identity for one worker)."""
        if not self.distributed:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()


def _ray_context() -> WorkerContext:
    import ray.train

    ctx = ray.train.get_context()
    return WorkerContext(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), in_ray=True)


# --- data --------------------------------------------------------------------------------------
def load_data(cfg: dict) -> dict:
    """Train and test tensors for the run, read from S3 (cached per process)."""
    from dtrain import datasets

    train_x, train_y = datasets.load(cfg["dataset"], "train")
    test_x, test_y = datasets.load(cfg["dataset"], "test")
    return {"train": (train_x[:cfg["train_samples"]], train_y[:cfg["train_samples"]]),
            "test": (test_x[:cfg["test_samples"]], test_y[:cfg["test_samples"]])}


def shard_order(count: int, rank: int, world_size: int, seed: int, epoch: int):
    """This rank's sample indices for an epoch: every rank shuffles with the same seed
    (seed + epoch, like DistributedSampler.set_epoch) and takes every world_size-th index.
    The tail is dropped so all ranks do the same number of steps (allreduce needs it)."""
    import torch

    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch))
    per_rank = count // world_size
    return order[rank::world_size][:per_rank]


# --- checkpoints -------------------------------------------------------------------------------
def _unwrap(net):
    """The plain module inside DistributedDataParallel (its state_dict has no prefix)."""
    return getattr(net, "module", net)


def _save_checkpoint(directory: str, net, optimizer, scheduler, epoch: int, history: list[dict]) -> None:
    import torch

    torch.save({"model": _unwrap(net).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history},
               Path(directory) / CHECKPOINT_FILE)


def load_checkpoint(checkpoint) -> dict:
    """The saved state dict of a Ray ``Checkpoint`` (local or in S3)."""
    import torch

    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _restore(net, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load the latest checkpoint of this run, if Ray has one: (epochs done, history)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    state = load_checkpoint(checkpoint)
    _unwrap(net).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["history"]


def _report(ctx: WorkerContext, metrics: dict, net, optimizer, scheduler, history: list[dict]) -> None:
    """Report an epoch to Ray; rank 0 attaches the checkpoint (Train V2 needs one for
    ``Result.metrics``). Every rank must call this: it is a barrier."""
    import ray.train

    if ctx.rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="dtrain-ckpt-") as directory:
        _save_checkpoint(directory, net, optimizer, scheduler, metrics["epoch"], history)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_epoch_{metrics['epoch']:03d}")


def _say(ctx: WorkerContext, marker: str, payload) -> None:
    """One machine-readable log line from rank 0 (the job log is the only channel the
    submitter sees while the job runs)."""
    if ctx.rank == 0:
        # sys.stdout.write, not print: Ray Train patches print() in workers to log *and*
        # echo, which shows every line twice in the job log.
        sys.stdout.write(f"{marker} {json.dumps(payload, sort_keys=True)}\n")
        sys.stdout.flush()


# --- the loop ----------------------------------------------------------------------------------
def _sync_buffers(ctx: WorkerContext, net) -> None:
    """Give every rank rank 0's BatchNorm statistics. Each rank updated its own on its
    own batches; rank 0's are the ones saved in the checkpoint, so the accuracy reported
    is the accuracy of the published model."""
    if ctx.distributed:
        import torch.distributed as dist

        for buffer in _unwrap(net).buffers():
            dist.broadcast(buffer.data, src=0)


def _evaluate_shard(ctx: WorkerContext, net, images, labels) -> dict:
    """Test loss and accuracy over the whole test set, each rank scoring its stride.
    The plain module is used, not DDP: ranks score different numbers of batches, and
    DDP's forward would try to synchronise them."""
    _sync_buffers(ctx, net)
    result = model_lib.evaluate(_unwrap(net), images[ctx.rank::ctx.world_size],
                                labels[ctx.rank::ctx.world_size])
    loss_sum, correct, count = ctx.all_sum([result["loss"] * result["count"],
                                            result["accuracy"] * result["count"], result["count"]])
    return {"test_loss": loss_sum / max(count, 1), "test_accuracy": correct / max(count, 1),
            "test_count": int(count)}


def _crash_if_asked(cfg: dict, ctx: WorkerContext, epoch: int, step: int, steps: int, start_epoch: int) -> None:
    if (ctx.in_ray and cfg["fail_at_epoch"] == epoch + 1 and start_epoch == 0
            and ctx.rank == ctx.world_size - 1 and step == steps // 2):
        print(f"dtrain: fail_at_epoch={epoch + 1}: rank {ctx.rank} exits on purpose", flush=True)
        os._exit(17)


def train_loop(cfg: dict, ctx: WorkerContext, data: dict | None = None) -> list[dict]:
    """Train for ``cfg['epochs']`` epochs and return the per-epoch metrics history.

    Inside Ray (``ctx.in_ray``) the model is wrapped for DDP, the run resumes from Ray's
    checkpoint and every epoch is reported; outside it, it is the same arithmetic in one
    process (world size 1).
    """
    import torch

    cfg = run_config(cfg)
    torch.set_num_threads(cfg["cpus_per_worker"])
    torch.manual_seed(cfg["seed"])
    started = time.time()
    data = data or load_data(cfg)
    data_load_s = time.time() - started
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    if len(train_x) < ctx.world_size:
        raise TrainingError(f"{len(train_x)} training samples cannot be split over {ctx.world_size} workers")

    net = model_lib.build_model(cfg)
    if ctx.in_ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
        net = ray.train.torch.prepare_model(net)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = net.to(device)
    local_batch = cfg["batch_size"] // ctx.world_size
    steps = math.ceil((len(train_x) // ctx.world_size) / local_batch)
    optimizer = model_lib.make_optimizer(net, cfg)
    scheduler = model_lib.make_scheduler(optimizer, cfg, steps, cfg["epochs"])
    loss_fn = model_lib.loss_function(cfg)
    start_epoch, history = _restore(net, optimizer, scheduler) if ctx.in_ray else (0, [])
    if start_epoch:
        print(f"dtrain: rank {ctx.rank} resumes after epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, cfg["epochs"]):
        # Reseed per epoch (dropout draws from this RNG): a run resumed from a checkpoint
        # then repeats the unfaulted run's arithmetic exactly (tests/test_faults.py).
        torch.manual_seed(cfg["seed"] + epoch)
        net.train()
        epoch_start = time.time()
        order = shard_order(len(train_x), ctx.rank, ctx.world_size, cfg["seed"], epoch)
        loss_sum, first_step_at = 0.0, None
        for step in range(steps):
            _crash_if_asked(cfg, ctx, epoch, step, steps, start_epoch)
            index = order[step * local_batch:(step + 1) * local_batch]
            x, y = train_x[index].to(device), train_y[index].to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            if epoch == start_epoch and step == 0:
                first_step_at = time.time()
                _say(ctx, FIRST_STEP_MARKER, {"time": first_step_at, "data_load_s": round(data_load_s, 3)})
        train_time = time.time() - epoch_start
        (train_loss,) = ctx.all_sum([loss_sum / steps])
        metrics = {"epoch": epoch + 1, "epochs": cfg["epochs"], "train_loss": train_loss / ctx.world_size,
                   **_evaluate_shard(ctx, net, test_x, test_y),
                   "epoch_time_s": round(time.time() - epoch_start, 3), "train_time_s": round(train_time, 3),
                   "samples_per_s": round(steps * local_batch * ctx.world_size / train_time, 1),
                   "data_load_s": round(data_load_s, 3), "world_size": ctx.world_size,
                   "resumed_from_epoch": start_epoch, "lr": scheduler.get_last_lr()[0],
                   "first_step_at": first_step_at}
        history = [*history, metrics]
        _say(ctx, EPOCH_MARKER, metrics)
        if ctx.in_ray:
            _report(ctx, metrics, net, optimizer, scheduler, history)
    run_local.last_model = _unwrap(net)  # lets callers of run_local keep the weights
    return history


def train_func(config: dict) -> None:
    """The function Ray Train's TorchTrainer runs on every worker."""
    train_loop(config, _ray_context())


def run_local(config: dict | None = None, data: dict | None = None) -> list[dict]:
    """The same loop without Ray: one process, world size 1. ``data`` ({"train": (x, y),
    "test": (x, y)}) skips the S3 read. The trained module is left in
    ``run_local.last_model``."""
    return train_loop(run_config({**(config or {}), "workers": 1}), WorkerContext(), data)


run_local.last_model = None


def driver_main(args) -> dict:
    """The Ray job driver (``dtrain train --driver``); lives in :mod:`dtrain.driver`."""
    from dtrain import driver

    return driver.driver_main(args)


def print_result(result: dict) -> None:
    """The final line the submitter looks for in the job log."""
    print(f"{RESULT_MARKER} {json.dumps(result, sort_keys=True, default=str)}", flush=True)
    sys.stdout.flush()
