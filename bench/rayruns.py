"""The Ray runs: the same recipe submitted to the local multi-node cluster, end to end.

The cluster (head + 2 worker nodes) is started once, timed, and kept for all Ray runs,
so ray-1 pays the cold start of the first job and ray-2 measures a warm cluster — the
situation of a user who runs ``dtrain cluster up`` once and submits several jobs.
"""

from __future__ import annotations

import statistics
import time

from memory import PeakSampler

from dtrain import cluster, s3server


def normalize(result: dict, workers: int, wall_s: float) -> dict:
    """submit()'s result → the benchmark's run record.

    The curve is on the same clock as the plain run: submit → first training step, then
    training time only (each epoch's ``train_time_s``), so the per-epoch evaluation and
    checkpoint upload are left out exactly as the plain run leaves evaluation out. What
    the submitter actually observed (``since_submit_s``, log arrival) is kept beside it,
    and ``end_to_end_s`` is the real submit → model-in-MinIO time.
    """
    timings, history = result.get("timings") or {}, result.get("history") or []
    first_step = timings.get("submit_to_first_step_s")
    curve, clock = [], first_step or 0.0
    for row in history:
        clock += row["train_time_s"]
        curve.append({"wall_s": round(clock, 3), "epoch": row["epoch"], "accuracy": round(row["test_accuracy"], 4),
                      "observed_since_submit_s": row.get("since_submit_s")})
    epoch_times = [row["train_time_s"] for row in history]
    return {"name": f"ray-{workers}", "recipe": f"submit() → {workers} Ray Train worker(s) × 1 CPU",
            "workers": workers, "curve": curve,
            "per_epoch_s": round(statistics.median(epoch_times), 3) if epoch_times else None,
            "epoch_train_s": epoch_times, "epoch_wall_s": [row.get("epoch_time_s") for row in history],
            "submit_to_first_step_s": first_step, "end_to_end_s": round(timings.get("total_s") or wall_s, 2),
            "clock_s": round(clock, 2), "best_accuracy": max((p["accuracy"] for p in curve), default=None),
            "note": f"first step after {first_step} s" if first_step is not None else "",
            "timings": timings, "run_id": result.get("run_id"), "model_uri": result.get("model_uri")}


def time_to_target(run: dict, target: float) -> float | None:
    """Seconds from submit to the end of the first epoch reaching ``target`` (on the
    evaluation-excluded clock of :func:`normalize`)."""
    return next((p["wall_s"] for p in run["curve"] if p["accuracy"] >= target), None)


def run_series(dataset: str, worker_counts: list[int], epochs: int, target: float,
               deadline: float | None = None) -> dict:
    """Cluster up (timed), then one submitted run per worker count, each with the stack's
    memory sampled; the cluster is stopped afterwards only if this call started it."""
    from dtrain import submit as submitter

    was_running = cluster.status().get("healthy", False)
    started = time.perf_counter()
    info = cluster.up(workers=2)
    cluster_up_s = None if was_running else round(time.perf_counter() - started, 1)
    runs, skipped, minio_pid = [], [], s3server.status().get("pid")
    try:
        for workers in worker_counts:
            # ray-1 and ray-2 carry the headline ratios: only the extra counts are optional.
            if workers > 2 and deadline is not None and time.monotonic() > deadline:
                skipped.append(f"ray-{workers}")
                continue
            began = time.perf_counter()
            # One sampler per run: each run's peak is the stack it needs (cluster + its workers).
            with PeakSampler(minio_pid, info.get("temp_dir")) as sampler:
                result = submitter.submit(dataset, workers=workers, epochs=epochs, progress=False,
                                          echo=lambda line: None)
            run = normalize(result, workers, time.perf_counter() - began)
            run["time_to_target_s"] = time_to_target(run, target)
            run["memory"] = sampler.result()
            runs.append(run)
            print(f"bench: ray-{workers}: {run['end_to_end_s']} s end to end, first step after "
                  f"{run['submit_to_first_step_s']} s, best {run['best_accuracy']}, "
                  f"peak RSS {run['memory']['peak_rss_gib']} GiB", flush=True)
    finally:
        if not was_running:
            cluster.down()
    return {"cluster_up_s": cluster_up_s, "cluster_was_running": was_running, "runs": runs, "skipped": skipped}
