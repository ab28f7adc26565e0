"""The Ray job driver: check the request, run ``TorchTrainer.fit()``, publish the model.

This is what ``python -m dtrain train --driver …`` runs, inside a Ray job (submitted
through the Jobs API, or as a KubeRay RayJob's entrypoint) or by hand. It fails fast
with one line when the request cannot work (more CPUs than the cluster has, dataset not
in the bucket) instead of letting Ray wait forever for resources.

A finished run is published to ``s3://models/<run-id>/`` (model.pt, config.json,
metrics.json) and only then is ``s3://models/latest.json`` moved to it, so the pointer
never names a half-written run. Checkpoints stay in ``s3://checkpoints/runs/<run-id>/``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import time
from datetime import UTC, datetime

from dtrain import config, train
from dtrain.errors import TrainingError

CHECKPOINT_PREFIX = "runs"
LATEST_KEY = "latest.json"
# A run id is one path segment: an S3 prefix, a Ray run name and a Kubernetes label.
RUN_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9.-]{0,62}$")
# The job supervisor sets this in the driver's environment; by-hand drivers lack it.
IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RECIPE_KEYS = ("batch_size", "lr", "weight_decay", "label_smoothing", "seed")


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id or ""):
        raise TrainingError(f"bad run id {run_id!r}: use lower-case letters, digits, '-' and '.', "
                            "at most 63 characters, starting with a letter or digit")
    return run_id


def git_sha() -> str | None:
    """The commit the code came from: $DTRAIN_GIT_SHA (set by the submitter, since a job's
    copy of the package has no .git), else ``git rev-parse`` in the project."""
    if os.environ.get("DTRAIN_GIT_SHA"):
        return os.environ["DTRAIN_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=config.PROJECT_ROOT,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# --- checks --------------------------------------------------------------------------------------
def connect_ray() -> None:
    """``ray.init()`` onto the current cluster (never with num_cpus: refused on an existing
    cluster). Outside a Ray job the S3 settings travel to the workers as env vars, the
    way the job's runtime_env (or the Kubernetes Secret) carries them otherwise."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get(IN_RAY_JOB_ENV):
        ray.init()
    else:
        ray.init(runtime_env={"env_vars": config.s3_settings().as_env()})


def check_resources(workers: int, cpus_per_worker: int) -> dict:
    """Fail now when the training workers cannot all be placed (Ray would wait forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, wanted = total.get("CPU", 0), workers * cpus_per_worker
    if wanted > cpus:
        raise TrainingError(f"asked for {workers} workers × {cpus_per_worker} CPU but the cluster has "
                            f"{cpus:g} CPUs: use --workers {max(1, int(cpus) // cpus_per_worker)} or fewer, "
                            "or add worker nodes")
    return {"cluster_cpus": cpus, "cluster_gpus": total.get("GPU", 0)}


def check_inputs(cfg: dict, run_id: str, datasets_bucket: str = config.DATASETS_BUCKET) -> None:
    """The dataset is published, and the run id is not already a published model."""
    from dtrain import datasets, storage

    datasets.read_manifest(cfg["dataset"], datasets_bucket)
    has_models = config.MODELS_BUCKET in storage.list_buckets()
    if has_models and storage.exists(config.MODELS_BUCKET, f"{run_id}/model.pt"):
        raise TrainingError(f"run id '{run_id}' already has a model in s3://{config.MODELS_BUCKET}/: "
                            "pick another --run-id")


# --- fit -----------------------------------------------------------------------------------------
def build_trainer(cfg: dict, run_id: str, use_gpu: bool = False):
    """A TorchTrainer for the run; checkpoints go to s3://checkpoints/runs/<run-id>/."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dtrain import storage

    storage.ensure_bucket(config.CHECKPOINTS_BUCKET)
    return TorchTrainer(
        train.train_func,
        train_loop_config=cfg,
        # SPREAD (best effort): workers go to different nodes when they can, as the 8 workers
        # spread over the 2 worker nodes of the KubeRay cluster; PACK would fill one node first.
        scaling_config=ScalingConfig(num_workers=cfg["workers"], use_gpu=use_gpu, placement_strategy="SPREAD",
                                     resources_per_worker={"CPU": cfg["cpus_per_worker"],
                                                           **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(
            name=run_id, storage_path=f"{config.CHECKPOINTS_BUCKET}/{CHECKPOINT_PREFIX}",
            storage_filesystem=storage.pyarrow_filesystem(),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg["max_failures"])))


def fit(trainer):
    """``trainer.fit()``, with Ray's multi-line failure turned into one TrainingError line."""
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray raises TrainingFailedError subclasses with long texts
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "")
        raise TrainingError(f"training failed: {type(exc).__name__}: {detail[:300]}") from exc
    if result.checkpoint is None:
        raise TrainingError("training ended without a checkpoint: no epoch finished")
    return result


# --- publish -------------------------------------------------------------------------------------
def run_metadata(cfg: dict, run_id: str) -> dict:
    """config.json: what rebuilds the model and what produced it."""
    import ray
    import torch

    from dtrain import datasets, model, versions

    mean, std = datasets.NORMALIZATION[cfg["dataset"]]
    return {**model.architecture(cfg), **{k: cfg[k] for k in RECIPE_KEYS},
            "run_id": run_id, "dataset": cfg["dataset"], "classes": datasets.class_names(cfg["dataset"]),
            "normalization": {"mean": mean, "std": std}, "workers": cfg["workers"],
            "cpus_per_worker": cfg["cpus_per_worker"], "epochs": cfg["epochs"],
            "ray_version": ray.__version__, "torch_version": torch.__version__,
            "dtrain_version": versions.PACKAGE_VERSION, "git_sha": git_sha(),
            "created_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def _json_bytes(data: dict) -> bytes:
    return json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"


def publish_model(run_id: str, state_dict: dict, metadata: dict, metrics: dict) -> str:
    """Upload the run to s3://models/<run-id>/, then move latest.json to it (last)."""
    import torch

    from dtrain import storage

    bucket = config.MODELS_BUCKET
    storage.ensure_bucket(bucket)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    storage.upload_bytes(buffer.getvalue(), bucket, f"{run_id}/model.pt", content_type="application/octet-stream")
    storage.upload_bytes(_json_bytes(metadata), bucket, f"{run_id}/config.json", content_type="application/json")
    storage.upload_bytes(_json_bytes(metrics), bucket, f"{run_id}/metrics.json", content_type="application/json")
    storage.upload_bytes(_json_bytes({"run_id": run_id, "updated_utc": metadata["created_utc"]}), bucket,
                         LATEST_KEY, content_type="application/json")
    return f"s3://{bucket}/{run_id}/"


def run(cfg: dict, run_id: str) -> dict:
    """Check, train and publish one run on the connected cluster; returns the result dict
    that ``DTRAIN_RESULT`` carries."""
    started = time.time()
    cfg = train.run_config(cfg)
    check_run_id(run_id)
    connect_ray()
    connected = time.time()
    resources = check_resources(cfg["workers"], cfg["cpus_per_worker"])
    check_inputs(cfg, run_id)
    checked = time.time()
    use_gpu = resources["cluster_gpus"] >= cfg["workers"]
    result = fit(build_trainer(cfg, run_id, use_gpu=use_gpu))
    fitted = time.time()
    state = train.load_checkpoint(result.checkpoint)
    history = state["history"]
    checkpoint_uri = f"s3://{result.checkpoint.path.lstrip('/')}"
    first_step = next((m["first_step_at"] for m in history if m.get("first_step_at")), None)
    timings = {"ray_init_s": connected - started, "checks_s": checked - connected, "fit_s": fitted - checked,
               "driver_start_to_first_step_s": first_step - started if first_step else None,
               "epoch_time_s": [m["epoch_time_s"] for m in history],
               "data_load_s": history[0]["data_load_s"] if history else None}
    final = {k: history[-1][k] for k in ("epoch", "train_loss", "test_loss", "test_accuracy")}
    metrics = {"run_id": run_id, "history": history, "final": final, "checkpoint": checkpoint_uri,
               "resumed_from_epoch": max(m["resumed_from_epoch"] for m in history), "timings": timings}
    model_uri = publish_model(run_id, state["model"], run_metadata(cfg, run_id), metrics)
    timings.update(publish_s=time.time() - fitted, driver_total_s=time.time() - started)
    timings = {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}
    return {**metrics, "timings": timings, "model_uri": model_uri, "dataset": cfg["dataset"],
            "workers": cfg["workers"], "epochs": cfg["epochs"], "use_gpu": use_gpu}


def driver_main(args) -> dict:
    """Entry point of ``dtrain train --driver``: run, then print the DTRAIN_RESULT line."""
    cfg = {**train.check_extra(getattr(args, "extra_config", None)), "dataset": args.dataset,
           "workers": args.workers, "epochs": args.epochs, "cpus_per_worker": args.cpus_per_worker,
           "batch_size": args.batch_size, "lr": args.lr}
    result = run(cfg, args.run_id)
    train.print_result(result)
    return result
