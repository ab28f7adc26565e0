"""Training on a real local Ray cluster (head + 2 worker nodes of 2 CPUs, token auth) with
the real MinIO: the full ``dtrain train`` path through the Jobs API, a run that loses a
worker and resumes from its checkpoint, and a request too big for the cluster.

Slow: each run starts Ray Train workers (tens of seconds on 2 cores) and trains."""

from __future__ import annotations

import json
import os
import time

import pytest

from dtrain import cluster, config, datasets, evaluate, storage, submit
from dtrain.errors import TrainingError

pytestmark = pytest.mark.slow

DATASET = "fashion-mnist"
CLUSTER_CPUS = 4  # 2 worker nodes × 2


def _measure(name: str, value) -> None:
    print(f"\n[measure] {name}: {value}")


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """Fashion-MNIST in the bucket and a 2-node cluster of 4 CPUs for the module."""
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(key, None)
    datasets.prepare(DATASET)
    info = cluster.up(workers=2, cpus_per_node=CLUSTER_CPUS // 2)
    assert info["healthy"], info
    yield info
    cluster.down()


def test_two_workers_reach_89_percent_in_two_epochs(ray_cluster):
    lines: list[str] = []
    started = time.monotonic()
    result = submit.submit(DATASET, workers=2, epochs=2, echo=lines.append, progress=False)
    wall = time.monotonic() - started
    history, timings = result["history"], result["timings"]
    _measure("2 workers × 2 epochs", json.dumps({
        "end_to_end_s": round(wall, 1), "submit_to_first_step_s": timings["submit_to_first_step_s"],
        "epoch_time_s": timings["epoch_time_s"], "accuracy": [round(m["test_accuracy"], 4) for m in history],
        "samples_per_s": [m["samples_per_s"] for m in history], "data_load_s": timings["data_load_s"]}))
    assert [m["epoch"] for m in history] == [1, 2]
    assert result["final"]["test_accuracy"] >= 0.89
    assert history[0]["train_loss"] > history[1]["train_loss"]
    assert all(m["world_size"] == 2 and m["test_count"] == 10_000 for m in history)
    assert result["resumed_from_epoch"] == 0
    assert 0 < timings["submit_to_first_step_s"] < history[0]["since_submit_s"] < history[1]["since_submit_s"]
    # Every epoch line reached the log once (not twice: Ray's print patch is avoided).
    assert sum("DTRAIN_EPOCH" in line for line in lines) == 2
    # The model, its config and metrics are in MinIO, and latest.json points at them.
    run_id = result["run_id"]
    assert evaluate.latest_run() == run_id
    assert {o["key"] for o in storage.list_objects(config.MODELS_BUCKET, f"{run_id}/")} >= {
        f"{run_id}/{name}" for name in ("model.pt", "config.json", "metrics.json")}
    model_config = json.loads(storage.get_bytes(config.MODELS_BUCKET, f"{run_id}/config.json"))
    assert (model_config["workers"], model_config["epochs"], model_config["dataset"]) == (2, 2, DATASET)
    # Ray kept the two newest checkpoints under s3://checkpoints/runs/<run-id>/.
    keys = {o["key"] for o in storage.list_objects(config.CHECKPOINTS_BUCKET, f"runs/{run_id}/")}
    assert f"runs/{run_id}/checkpoint_epoch_002/checkpoint.pt" in keys
    assert result["checkpoint"] == f"s3://checkpoints/runs/{run_id}/checkpoint_epoch_002"
    # Evaluation reproduces the trainer's accuracy exactly (same weights, same test set).
    report = evaluate.evaluate(run_id, upload=False)
    assert report["accuracy"] == pytest.approx(result["final"]["test_accuracy"], abs=1e-9)


def test_a_worker_lost_mid_epoch_resumes_from_the_checkpoint(ray_cluster):
    """Rank 1 exits hard half-way through epoch 2 (first attempt only); Ray restarts the
    worker group, which loads the epoch-1 checkpoint and finishes the run."""
    lines: list[str] = []
    result = submit.submit(DATASET, workers=2, epochs=2, echo=lines.append, progress=False,
                           extra={"train_samples": 12_000, "test_samples": 4_000, "fail_at_epoch": 2})
    run_id, history = result["run_id"], result["history"]
    assert any("fail_at_epoch=2: rank 1 exits on purpose" in line for line in lines)
    assert any("resumes after epoch 1" in line for line in lines)
    _measure("resume after a lost worker", json.dumps({
        "resumed_from_epoch": result["resumed_from_epoch"], "accuracy": result["final"]["test_accuracy"],
        "fit_s": result["timings"]["fit_s"]}))
    assert result["resumed_from_epoch"] == 1
    assert [(m["epoch"], m["resumed_from_epoch"]) for m in history] == [(1, 0), (2, 1)]
    assert result["final"]["test_accuracy"] > 0.8
    assert evaluate.latest_run() == run_id


def test_more_workers_than_cpus_fails_fast_with_one_line(ray_cluster):
    started = time.monotonic()
    with pytest.raises(TrainingError) as caught:
        submit.submit(DATASET, workers=8, epochs=1, echo=lambda line: None, progress=False)
    seconds = time.monotonic() - started
    _measure("too many workers: seconds to the error", round(seconds, 1))
    message = str(caught.value)
    assert "asked for 8 workers × 1 CPU but the cluster has 4 CPUs" in message
    assert "\n" not in message and not message.count("dtrain: error:")
    assert seconds < 120  # it must not wait for resources that will never come
