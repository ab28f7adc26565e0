"""Submit the training driver as a Ray job and follow it to the end.

The job's runtime_env carries the package (``py_modules``) and the S3 settings
(``env_vars``): on Kubernetes the image and the ``minio-credentials`` Secret play those
roles. The log stream is echoed as it comes, a progress bar counts epochs from the
``DTRAIN_EPOCH`` lines rank 0 prints, and the driver's final ``DTRAIN_RESULT`` line is
the return value, with the submitter's own timings added.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shlex
import sys
import time
from datetime import UTC, datetime

from dtrain import config, train
from dtrain.errors import TrainingError

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
_MARKER = re.compile(rf"({train.EPOCH_MARKER}|{train.FIRST_STEP_MARKER}|{train.RESULT_MARKER}) (\{{.*\}})\s*$")
# What a useful failure line looks like, best first.
_ERROR_LINES = (re.compile(r"dtrain: error: .*"), re.compile(r"\w*(Error|Exception)\b.*"))
STATUS_POLL_S = 1.0


# Ray's job SDK logs "Uploading package…" at INFO on stderr; a failing command must print
# one line there, so keep only its warnings.
logging.getLogger("ray.dashboard.modules.dashboard_sdk").setLevel(logging.WARNING)


def make_run_id(dataset: str) -> str:
    """``<dataset>-<UTC yyyymmdd-hhmmss>-<4 hex>``: sortable by time, unique, and usable as
    an S3 prefix, a Ray run name and a Kubernetes name."""
    return f"{dataset}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def runtime_env(extra_env: dict | None = None, ship_package: bool = True) -> dict:
    """The job's runtime_env: S3 settings (the local stand-in for the minio-credentials
    Secret) and log settings, plus our package for a remote cluster. The local cluster's
    nodes run from this project's venv, where dtrain is installed already: shipping it
    again would make every worker wait for a runtime-env build (tens of seconds on 2 cores)."""
    from dtrain import driver

    env = {**config.s3_settings().as_env(), "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
           "DTRAIN_GIT_SHA": driver.git_sha() or ""}
    shipped = {"py_modules": [str(config.PACKAGE_DIR)]} if ship_package else {}
    return {**shipped, "env_vars": {**env, **(extra_env or {})}}


def _local_gcs_address(url: str) -> dict:
    """RAY_ADDRESS for the job's processes when ``url`` is our local cluster. Ray Train's
    helper actors call ``ray.init()`` without an address; with several Ray clusters on one
    host (parallel tests) auto-detection fails with "Found multiple active Ray instances"."""
    from dtrain import cluster
    from dtrain.errors import ClusterError

    try:
        env = cluster.client_env()
    except ClusterError:
        return {}
    return {"RAY_ADDRESS": env["RAY_ADDRESS"]} if env["RAY_API_SERVER_ADDRESS"].rstrip("/") == url else {}


class LogFollower:
    """Parses the job's log lines: echoes them, moves the epoch bar, records timings."""

    def __init__(self, epochs: int, submitted_at: float, echo=print, progress: bool = True):
        from tqdm import tqdm

        self.submitted_at, self.echo = submitted_at, echo
        self.bar = tqdm(total=epochs, unit="epoch", desc="training", disable=not progress,
                        file=sys.stderr, leave=False)
        self.first_step_at: float | None = None
        self.epochs: list[dict] = []
        self.result: dict | None = None
        self.tail: list[str] = []

    def feed(self, chunk: str) -> None:
        for line in chunk.splitlines():
            self.bar.clear()
            self.echo(line)
            self.bar.refresh()
            self.tail = [*self.tail[-199:], line]
            match = _MARKER.search(line)
            if match:
                self._on_marker(match.group(1), json.loads(match.group(2)))

    def _on_marker(self, marker: str, payload: dict) -> None:
        now = time.time()
        if marker == train.FIRST_STEP_MARKER and self.first_step_at is None:
            self.first_step_at = now
        elif marker == train.EPOCH_MARKER:
            self.epochs.append({**payload, "since_submit_s": round(now - self.submitted_at, 3)})
            self.bar.n = payload["epoch"]
            self.bar.set_postfix(acc=f"{payload['test_accuracy']:.4f}", loss=f"{payload['train_loss']:.3f}")
        elif marker == train.RESULT_MARKER:
            self.result = payload

    def error_line(self) -> str | None:
        """The most telling error line in the log: our own one-line errors first."""
        for pattern in _ERROR_LINES:
            for line in reversed(self.tail):
                found = pattern.search(line)
                if found:
                    return found.group(0).removeprefix("dtrain: error: ").strip()[:300]
        return None

    def close(self) -> None:
        self.bar.close()


async def _follow(client, job_id: str, follower: LogFollower) -> None:
    async for chunk in client.tail_job_logs(job_id):
        follower.feed(chunk)


def _wait_terminal(client, job_id: str, timeout_s: float = 60) -> str:
    """The job's final status (the log stream can end a moment before the status flips)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).rsplit(".", 1)[-1]
        if status in TERMINAL_STATES or time.monotonic() > deadline:
            return status
        time.sleep(STATUS_POLL_S)


def submit(dataset: str, workers: int, epochs: int, address: str | None = None, cpus_per_worker: int = 1,
           batch_size: int = train.RUN_DEFAULTS["batch_size"], lr: float | None = None,
           run_id: str | None = None, progress: bool = True, echo=print, extra: dict | None = None) -> dict:
    """Submit ``dtrain train --driver`` to the Ray cluster at ``address`` (default: the
    local cluster or $RAY_ADDRESS), stream its logs, and return the driver's result with
    ``timings`` (submit, submit → first step, per epoch, total). Ctrl-C stops the job.
    ``extra``: other run settings for tests and benchmarks (see train.RUN_DEFAULTS)."""
    from dtrain import cluster, driver

    began = time.time()
    cfg = train.run_config({**train.check_extra(extra), "dataset": dataset, "workers": workers,
                            "epochs": epochs, "cpus_per_worker": cpus_per_worker, "batch_size": batch_size,
                            "lr": lr})
    run_id = driver.check_run_id(run_id or make_run_id(cfg["dataset"]))
    entrypoint = shlex.join(train.driver_command(cfg["dataset"], workers, epochs, run_id, cpus_per_worker,
                                                 batch_size, lr, extra))
    url = cluster.resolve_address(address)
    client = cluster.job_client(url)
    local = _local_gcs_address(url)
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=f"dtrain-{run_id}",
                               runtime_env=runtime_env(local, ship_package=not local), metadata={"run_id": run_id},
                               entrypoint_num_cpus=0)
    submitted = time.time()
    echo(f"submitted job {job_id} (run {run_id}): {entrypoint}")
    follower = LogFollower(epochs, began, echo=echo, progress=progress)
    try:
        asyncio.run(_follow(client, job_id, follower))
        status = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        echo(f"stopped job {job_id}")
        raise
    finally:
        follower.close()
    if status != "SUCCEEDED" or follower.result is None:
        message = client.get_job_info(job_id).message or ""
        detail = follower.error_line() or (message.strip().splitlines() or ["no error line in the log"])[-1]
        raise TrainingError(f"job {job_id} {status.lower()}: {detail}")
    return _with_timings(follower, began, submitted, job_id)


def _with_timings(follower: LogFollower, began: float, submitted: float, job_id: str) -> dict:
    """The driver's result plus what only the submitter can time."""
    result = dict(follower.result)
    seen = {row["epoch"]: row["since_submit_s"] for row in follower.epochs}
    result["history"] = [{**row, "since_submit_s": seen.get(row["epoch"])} for row in result["history"]]
    first = follower.first_step_at
    result["timings"] = {**result.get("timings", {}), "submit_s": round(submitted - began, 3),
                         "submit_to_first_step_s": round(first - began, 3) if first else None,
                         "total_s": round(time.time() - began, 3)}
    result["job_id"] = job_id
    return result
