"""Fault injection on a real run: a real local Ray cluster (head + 2 worker nodes, token
auth) and the real MinIO of the ``s3`` fixture.

The promise under test: a lost worker, a lost worker node or a restarted MinIO costs at
most one epoch, never the run, and nothing in MinIO is lost or corrupted.

Each run is the production driver (``driver.run``: checks, ``TorchTrainer.fit``, publish)
submitted through the Ray Jobs API with the same runtime_env as ``dtrain train``. The
only difference from ``dtrain train`` is a Fashion-MNIST subset (``train_samples``), which
the CLI does not expose, so that four runs fit in a few minutes on 2 cores. Faults come
from outside, while the job runs: SIGKILL of a process, never a hook in the training code.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import threading
import time

import psutil
import pytest

from dtrain import cluster, config, datasets, raynodes, s3server, storage, submit

pytestmark = pytest.mark.slow

DATASET = "fashion-mnist"
# Small enough to be quick, large enough that an epoch lasts a few seconds (a kill must
# land inside one) and the accuracy comparison is not noise.
RUN = {"dataset": DATASET, "workers": 2, "epochs": 3, "train_samples": 10000, "test_samples": 5000}
MAX_ACCURACY_DELTA = 0.005  # 0.5 percentage points
RUN_TIMEOUT_S = 480
# The job entrypoint: the driver's own run(), with the subset in the config.
DRIVER_SCRIPT = ("import json, sys; from dtrain import driver, train; "
                 "train.print_result(driver.run(json.loads(sys.argv[1]), sys.argv[2]))")
MEASURED: dict[str, dict] = {}
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+INFO \S+\.py:\d+ -- ")


@pytest.fixture(scope="module")
def lab(s3):
    """Fashion-MNIST published, and a head + 2 worker nodes cluster for the module."""
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(key, None)
    datasets.prepare(DATASET)
    manifest = storage.get_bytes(config.DATASETS_BUCKET, f"{DATASET}/manifest.json")
    info = cluster.up(workers=2, cpus_per_node=4)
    assert info["healthy"], info
    yield {"state": config.read_json(cluster._state_path()), "manifest": manifest, "s3": s3}
    cluster.down()
    if MEASURED:
        print("\n[measure] faults: " + json.dumps(MEASURED, sort_keys=True))


class Job:
    """A training job submitted through the Jobs API, its log followed in a thread."""

    def __init__(self, run_id: str, run: dict = RUN):
        self.run_id = run_id
        self.client = cluster.job_client()
        entrypoint = shlex.join(["python", "-c", DRIVER_SCRIPT, json.dumps(run), run_id])
        self.started = time.monotonic()
        self.job_id = self.client.submit_job(entrypoint=entrypoint, submission_id=f"dtrain-{run_id}",
                                             runtime_env=submit.runtime_env(), entrypoint_num_cpus=0)
        self.lines: list[str] = []
        self.follower = submit.LogFollower(run["epochs"], time.time(), echo=self.lines.append, progress=False)
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        try:
            asyncio.run(submit._follow(self.client, self.job_id, self.follower))
        except Exception as exc:  # the stream can break when a node dies; status still tells
            self.lines.append(f"log stream ended: {exc!r}")

    def epochs_reported(self) -> int:
        """Epoch reports rank 0 printed so far, over all attempts."""
        return len(self.follower.epochs)

    def wait_for(self, predicate, what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            status = str(self.client.get_job_status(self.job_id))
            assert not status.endswith(("FAILED", "STOPPED", "SUCCEEDED")), \
                f"job ended ({status}) while waiting for {what}:\n" + "\n".join(self.lines[-40:])
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + "\n".join(self.lines[-40:])
            time.sleep(0.2)

    def wait_for_checkpoint(self, epoch: int) -> None:
        """Rank 0 reported the epoch and its checkpoint is in MinIO; then a little more so
        Ray has registered it, and the kill lands inside the next epoch."""
        key = f"runs/{self.run_id}/checkpoint_epoch_{epoch:03d}/{'checkpoint.pt'}"
        self.wait_for(lambda: self.epochs_reported() >= epoch, f"epoch {epoch} report")
        self.wait_for(lambda: _exists(config.CHECKPOINTS_BUCKET, key), f"checkpoint of epoch {epoch}")
        epoch_s = self.follower.epochs[epoch - 1]["epoch_time_s"]
        time.sleep(min(1.0 + epoch_s / 3, 6.0))

    def result(self) -> dict:
        self.thread.join(timeout=RUN_TIMEOUT_S)
        status = submit._wait_terminal(self.client, self.job_id, timeout_s=RUN_TIMEOUT_S)
        assert status == "SUCCEEDED" and self.follower.result, \
            f"job {status}:\n" + "\n".join(self.lines[-60:])
        return {**self.follower.result, "wall_s": round(time.monotonic() - self.started, 1),
                "epochs_reported": self.epochs_reported()}


def _exists(bucket: str, key: str) -> bool:
    try:
        return storage.exists(bucket, key)
    except storage.StorageError:  # MinIO may be restarting
        return False


def _train_workers(state: dict) -> list[psutil.Process]:
    """The RayTrainWorker processes of this cluster (Ray names the process after the actor)."""
    found = []
    for proc in raynodes.our_processes(state):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _check_store(lab: dict, run_id: str) -> int:
    """Every dataset and model object reads back with its sha256; the manifest is unchanged;
    the last checkpoint holds the published weights. Returns the objects checked."""
    import io

    import torch

    assert storage.get_bytes(config.DATASETS_BUCKET, f"{DATASET}/manifest.json") == lab["manifest"]
    checked = 0
    for bucket, prefix in ((config.DATASETS_BUCKET, f"{DATASET}/"), (config.MODELS_BUCKET, f"{run_id}/")):
        objects = storage.list_objects(bucket, prefix)
        assert objects, f"nothing under s3://{bucket}/{prefix}"
        for obj in objects:
            assert storage.object_info(bucket, obj["key"])["sha256"], obj["key"]
            storage.get_bytes(bucket, obj["key"])  # raises IntegrityError on any mismatch
            checked += 1
    published = torch.load(io.BytesIO(storage.get_bytes(config.MODELS_BUCKET, f"{run_id}/model.pt")),
                           weights_only=True)
    metrics = json.loads(storage.get_bytes(config.MODELS_BUCKET, f"{run_id}/metrics.json"))
    ckpt_key = metrics["checkpoint"].removeprefix(f"s3://{config.CHECKPOINTS_BUCKET}/") + "/checkpoint.pt"
    state = torch.load(io.BytesIO(storage.get_bytes(config.CHECKPOINTS_BUCKET, ckpt_key)), weights_only=True)
    assert state["epoch"] == RUN["epochs"]
    assert all(torch.equal(published[name], tensor) for name, tensor in state["model"].items())
    return checked + 1


def _assert_survived(lab: dict, baseline: dict, result: dict, done_at_fault: int, name: str,
                     must_resume: bool = True) -> None:
    resumed = result["resumed_from_epoch"]
    # ``done_at_fault`` counts the epoch reports seen in the log stream when the fault hit, and that
    # stream lags the job by a few seconds: on a quiet machine the next epoch (and its checkpoint)
    # can finish before its report reaches us. A run cannot resume from an epoch that had not
    # finished, so the epochs finished at the fault are at least ``resumed``.
    done_at_fault = max(done_at_fault, resumed)
    lost = done_at_fault - resumed if resumed or must_resume else 0
    delta = abs(result["final"]["test_accuracy"] - baseline["final"]["test_accuracy"])
    MEASURED[name] = {"epochs_done_at_fault": done_at_fault, "resumed_from_epoch": resumed,
                      "completed_epochs_rerun": lost, "epoch_reports": result["epochs_reported"],
                      "accuracy": result["final"]["test_accuracy"], "accuracy_delta_pp": round(100 * delta, 3),
                      "wall_s": result["wall_s"], "baseline_wall_s": baseline["wall_s"]}
    assert result["final"]["epoch"] == RUN["epochs"]
    if must_resume:
        assert resumed >= 1, f"{name}: the run started over instead of resuming"
    assert 0 <= lost <= 1, f"{name}: {lost} finished epochs were trained again"
    assert delta <= MAX_ACCURACY_DELTA, f"{name}: accuracy {delta:.4f} away from the unfaulted run"
    MEASURED[name]["objects_verified"] = _check_store(lab, result["run_id"])
    # Epochs reseed their RNG, so a resumed run can match the unfaulted one bit for bit.
    MEASURED[name]["weights_identical_to_baseline"] = _weights(result["run_id"]) == _weights(baseline["run_id"])


def _weights(run_id: str) -> str:
    """sha256 of the published model.pt's tensors (torch.save's bytes carry no timestamps)."""
    import hashlib
    import io

    import torch

    state = torch.load(io.BytesIO(storage.get_bytes(config.MODELS_BUCKET, f"{run_id}/model.pt")), weights_only=True)
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def baseline(lab):
    """The same run without faults: the reference accuracy and timings."""
    result = Job("faults-baseline").result()
    assert result["resumed_from_epoch"] == 0 and result["epochs_reported"] == RUN["epochs"]
    MEASURED["baseline"] = {"accuracy": result["final"]["test_accuracy"], "wall_s": result["wall_s"],
                            "objects_verified": _check_store(lab, "faults-baseline")}
    return result


def test_sigkill_one_training_worker(lab, baseline):
    job = Job("faults-worker-kill")
    job.wait_for_checkpoint(1)
    rank0 = next((e for e in job.follower.epochs if e.get("epoch") == 1), None)
    assert rank0 is not None
    victims = _train_workers(lab["state"])
    assert len(victims) == RUN["workers"], victims
    done = job.epochs_reported()
    victims[-1].send_signal(signal.SIGKILL)
    _assert_survived(lab, baseline, job.result(), done, "worker_sigkill")


def test_restart_minio_on_the_same_port(lab, baseline):
    """MinIO goes away mid-epoch and stays away over an epoch end (the checkpoint upload),
    then comes back on the same port with its data. Either pyarrow's retries carry the
    upload, or the attempt fails and the next one resumes from MinIO once it is back."""
    job = Job("faults-minio-restart")
    job.wait_for_checkpoint(1)
    port = s3server.status()["port"]
    done = job.epochs_reported()
    s3server.down()
    down_at = time.monotonic()
    try:
        job.wait_for(lambda: job.epochs_reported() > done, "the next epoch end while MinIO is down", 120)
        time.sleep(3)
    finally:
        restarted = s3server.up(port=port, backend="minio")
        MEASURED["minio_outage_s"] = round(time.monotonic() - down_at, 1)
    assert restarted["port"] == port
    result = job.result()
    _assert_survived(lab, baseline, result, done, "minio_restart", must_resume=False)
    MEASURED["minio_restart"]["attempt_failed"] = result["resumed_from_epoch"] > 0


def test_more_workers_than_the_cluster_holds_fails_fast(lab):
    """Ray would wait forever for 9 CPUs; the driver refuses at once, in one line."""
    import subprocess
    import sys

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dtrain", "train", "--dataset", DATASET, "--workers", "9",
                           "--epochs", "1", "--no-progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **cluster.client_env()})
    elapsed = time.monotonic() - started
    MEASURED["too_many_workers_s"] = round(elapsed, 1)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # Ray's job SDK logs its package upload at INFO on stderr ("2026-… INFO dashboard_sdk.py…");
    # apart from those, the one line is ours.
    lines = [line for line in proc.stderr.strip().splitlines() if not RAY_LOG_LINE.match(line)]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("dtrain: error: job ") and "failed: asked for 9 workers" in lines[0], lines[0]
    assert "--workers 8 or fewer" in lines[0], lines[0]
    assert elapsed < 180


def test_ray_refuses_a_client_without_the_token(lab):
    """ray.init from a process that has no token (auth mode off, as Ray's default) is refused."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(raynodes.LOOPBACK_ENV, RAY_AUTH_MODE="disabled")
    code = f"import ray; ray.init(address={lab['state']['address']!r}); print('CONNECTED')"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    MEASURED["tokenless_client_refused_after_s"] = round(time.monotonic() - started, 1)
    assert proc.returncode != 0 and "CONNECTED" not in proc.stdout
    assert "token" in proc.stderr.lower() or "auth" in proc.stderr.lower(), proc.stderr[-1500:]


def test_tls_end_to_end_training(lab, tmp_path, monkeypatch):
    """MinIO on HTTPS with the generated CA (its own state folder): prepare the dataset,
    then a 1-worker, 1-epoch job whose workers read the data through boto3 and write the
    checkpoint through pyarrow (tls_ca_file_path), both trusting the CA via AWS_CA_BUNDLE
    in the job's runtime_env."""
    cluster_home = os.environ["DTRAIN_HOME"]
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path))
    for key in (*config.S3_ENV_KEYS, "AWS_CA_BUNDLE"):
        monkeypatch.delenv(key, raising=False)
    s3server.up(tls=True, backend="minio")
    try:
        tls = config.s3_settings(environ={})
        assert tls.endpoint_url.startswith("https://127.0.0.1:") and tls.ca_bundle
        monkeypatch.setenv("DTRAIN_HOME", cluster_home)  # the Ray cluster's state
        for key, value in tls.as_env().items():
            monkeypatch.setenv(key, value)
        datasets.prepare(DATASET)
        run = {**RUN, "workers": 1, "epochs": 1, "train_samples": 2000, "test_samples": 1000}
        started = time.monotonic()
        result = Job("tls-end-to-end", run).result()
        MEASURED["tls_run"] = {"accuracy": result["final"]["test_accuracy"],
                               "wall_s": round(time.monotonic() - started, 1)}
        assert result["final"]["epoch"] == 1 and result["final"]["test_accuracy"] > 0.2  # chance: 0.1
        checkpoints = storage.list_objects(config.CHECKPOINTS_BUCKET, "runs/tls-end-to-end/")
        assert any(o["key"].endswith("/checkpoint.pt") for o in checkpoints), checkpoints
        for key in ("model.pt", "config.json", "metrics.json"):
            storage.get_bytes(config.MODELS_BUCKET, f"tls-end-to-end/{key}")  # sha256-checked, over HTTPS
        plain = storage.client(lab["s3"])  # nothing went to the plain-HTTP MinIO
        assert config.MODELS_BUCKET not in [b["Name"] for b in plain.list_buckets()["Buckets"]] or \
            plain.list_objects_v2(Bucket=config.MODELS_BUCKET, Prefix="tls-end-to-end/")["KeyCount"] == 0
    finally:
        monkeypatch.setenv("DTRAIN_HOME", str(tmp_path))
        s3server.down()
        monkeypatch.setenv("DTRAIN_HOME", cluster_home)


def test_lose_a_whole_worker_node(lab, baseline):
    """Runs last (file order): a worker node stays dead. SIGKILL of every process of the
    node that hosts the training workers (raylet, agents, workers), like a machine that
    vanishes; the other node's 4 CPUs still hold 2 workers."""
    job = Job("faults-node-loss")
    job.wait_for_checkpoint(1)
    victims = _train_workers(lab["state"])
    assert victims
    session = os.getsid(victims[0].pid)
    node = next(n for n in lab["state"]["nodes"] if n["session_id"] == session)
    assert node["name"].startswith("worker-")
    members = [p for p in psutil.process_iter() if _sid(p.pid) == session]
    assert any(p.name() == "raylet" for p in members), [p.name() for p in members]
    done = job.epochs_reported()
    for proc in members:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    result = job.result()
    _assert_survived(lab, baseline, result, done, "node_loss")
    MEASURED["node_loss"]["node"] = node["name"]
    alive = [n for n in cluster.status()["nodes"] if n["alive"]]
    assert len(alive) == 2  # head + the surviving worker node


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None
