"""Turn the measurements into ratios against targets, a JSON file, a table and a plot."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

# (key, how it is computed, comparison, target). "le": the ratio must be at most the
# target; "ge": at least.
TARGETS = (
    ("ray2_over_plain_end_to_end", "ray-2 submit→target ÷ plain load+train→target", "le", 1.5),
    ("ray2_over_plain_per_epoch", "ray-2 epoch time ÷ plain epoch time", "le", 1.2),
    ("submit_to_first_step_s", "ray-2 submit → first training step, warm cluster (s)", "le", 8.0),
    ("examples_over_ours_time_to_target", "pytorch/examples time-to-target ÷ ours", "ge", 4.0),
    ("minio_over_disk_load", "MinIO load ÷ local-disk load (median)", "le", 1.2),
    ("peak_rss_gib", "peak RSS of MinIO + Ray nodes + workers during ray-2 (GiB)", "le", 4.0),
)


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def verdict(value: float | None, comparison: str, target: float, floor: bool = False) -> str:
    """'met', 'MISSED' or 'not measured'. ``floor``: the value is a lower bound (a peer
    that never reached the target within its cap), which still proves a 'ge' target."""
    if value is None:
        return "not measured"
    ok = value <= target if comparison == "le" else value >= target
    return "met" + (" (lower bound)" if floor else "") if ok else "MISSED"


def machine_info() -> dict:
    import ray
    import torch

    from dtrain import versions

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "ray": ray.__version__, "ray_pinned": versions.RAY_VERSION,
            "minio": versions.MINIO_VERSION, "load_average": [round(x, 2) for x in os.getloadavg()],
            "processor": platform.processor() or platform.machine()}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def runs_table(runs: list[dict]) -> list[str]:
    """Markdown rows, one per run: what it is and its headline numbers."""
    lines = ["| run | recipe | per epoch (s) | time to target (s) | end to end (s) | best acc | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for run in runs:
        ttt = run.get("time_to_target_s")
        ttt_text = _fmt(ttt, 1) if ttt is not None else f"> {_fmt(run.get('clock_s'), 1)} (not reached)"
        lines.append(f"| {run['name']} | {run.get('recipe', '')} | {_fmt(run.get('per_epoch_s'), 2)} | {ttt_text} | "
                     f"{_fmt(run.get('end_to_end_s'), 1)} | {_fmt(run.get('best_accuracy'), 4)} | {run.get('note', '')} |")
    return lines


def targets_table(results: dict) -> list[str]:
    lines = ["| measure | value | target | verdict |", "| --- | ---: | ---: | --- |"]
    for key, label, comparison, target in TARGETS:
        sign = "≤" if comparison == "le" else "≥"
        lines.append(f"| {label} (`{key}`) | {_fmt(results.get(key), 3)} | {sign} {target:g} | "
                     f"{results['verdicts'][key]} |")
    return lines


RAY_PHASES = ("submit_s", "ray_init_s", "checks_s", "data_load_s", "driver_start_to_first_step_s",
              "submit_to_first_step_s", "fit_s", "publish_s", "driver_total_s", "total_s")


def ray_phase_table(results: dict) -> list[str]:
    """Where a Ray run's seconds go, one column per run (the driver's and submitter's timings)."""
    runs = (results.get("ray") or {}).get("runs") or []
    if not runs:
        return []
    lines = ["| phase (s) | " + " | ".join(run["name"] for run in runs) + " |",
             "| --- |" + " ---: |" * len(runs)]
    for phase in RAY_PHASES:
        lines.append(f"| {phase} | " + " | ".join(_fmt(run["timings"].get(phase), 2) for run in runs) + " |")
    lines.append("| epoch train time | " + " | ".join(
        ", ".join(_fmt(s, 2) for s in run["epoch_train_s"]) for run in runs) + " |")
    lines.append("| epoch wall time (with eval + checkpoint) | " + " | ".join(
        ", ".join(_fmt(s, 2) for s in run["epoch_wall_s"]) for run in runs) + " |")
    return lines


def details(results: dict) -> list[str]:
    """One line per secondary measurement."""
    dp, ray = results.get("data_path") or {}, results.get("ray") or {}
    lines = [f"data path (train+test, median of {dp.get('repetitions')}): same bytes and decode — MinIO "
             f"{_fmt(dp.get('minio_median_s'), 3)} s, local disk {_fmt(dp.get('disk_median_s'), 3)} s; library loaders — "
             f"datasets.load (MinIO) {_fmt(dp.get('library_load_median_s'), 3)} s, datasets.load_local "
             f"(decompressed cache) {_fmt(dp.get('library_load_local_median_s'), 3)} s",
             f"MinIO load stages, training images: {dp.get('minio_stages_s')}",
             f"data into memory for the in-process runs (local disk): {_fmt(results.get('data_load_in_memory_s'), 2)} s",
             f"ray-example accuracy at our time to target: {_fmt(results.get('ray_example_accuracy_at_our_time_to_target'), 4)}",
             f"ray-2 total (submit → model in MinIO) ÷ plain (load + all epochs): {_fmt(results.get('ray2_over_plain_total'), 3)}"]
    if results.get("profile"):
        prof = results["profile"]
        lines.append(f"step profile (ms): plain {prof['plain_step']['ms']}; one ray-2 worker {prof['ray2_worker_step']['ms']}; "
                     f"gloo allreduce of {prof['parameters']} float32 between 2 processes "
                     f"{prof['allreduce_ms_2_workers']} ms")
    lines.append(f"ray-2 ÷ plain, fastest epoch of each: {_fmt(results.get('ray2_over_plain_best_epoch'), 3)}")
    if ray:
        lines.append(f"cluster up (head + 2 worker nodes): {_fmt(ray.get('cluster_up_s'), 1)} s"
                     + (" (already running: not timed)" if ray.get("cluster_was_running") else ""))
        for run in ray.get("runs", []):
            mem = run["memory"]
            top = ", ".join(f"{p['process']} {p['rss_mib']}" for p in mem["top_at_peak"])
            lines.append(f"memory during {run['name']}: peak RSS {mem['peak_rss_gib']} GiB, peak PSS "
                         f"{mem['peak_pss_gib']} GiB over {mem['peak_processes']} processes; biggest (MiB): {top}")
        if ray.get("skipped"):
            lines.append(f"skipped for time: {', '.join(ray['skipped'])}")
    return lines


def markdown(results: dict) -> str:
    info, target = results["machine"], results["target"]
    parts = [f"# Benchmark — {results['mode']} mode, {results['date']}", "",
             f"Dataset {results['dataset']}, target {target['accuracy']:.0%} test accuracy. "
             f"{info['cpu_count']} CPUs, {info['memory_gib']} GiB, torch {info['torch']} "
             f"({info['torch_threads']} threads), Ray {info['ray']}; load average at start {results['load_average_start']}, "
             f"at end {info['load_average']}.", "", f"MNIST: {results['mnist_note']}", "", "## Targets", "",
             *targets_table(results), "", "## Runs", "", *runs_table(results["runs"]), ""]
    phases = ray_phase_table(results)
    if phases:
        parts += ["## Where a Ray run's seconds go", "", *phases, ""]
    parts += ["## Details", ""] + [f"- {line}" for line in details(results) + results.get("notes", [])]
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> None:
    """Test accuracy against seconds since the run started (evaluation time excluded),
    one line per run; the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for run in results["runs"]:
        points = run.get("curve") or []
        if points:
            ax.plot([p["wall_s"] for p in points], [p["accuracy"] * 100 for p in points], marker=".",
                    label=run["name"])
    ax.axhline(results["target"]["accuracy"] * 100, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("seconds since start (for Ray runs: since submit; evaluation time excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(60, 95)
    ax.set_title(f"{results['dataset']}: accuracy vs wall time ({results['mode']}, {results['machine']['cpu_count']} CPUs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: dict, out_dir: Path, image_copy: Path | None) -> dict[str, Path]:
    """latest.json, latest.md and latest.png in ``out_dir`` (plus the PNG copied to
    ``image_copy``); every file written beside then renamed, so readers see whole files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "latest.json", "md": out_dir / "latest.md", "png": out_dir / "latest.png"}
    for kind, text in (("json", json.dumps(results, indent=2, sort_keys=True) + "\n"), ("md", markdown(results))):
        tmp = paths[kind].with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(paths[kind])
    tmp_png = out_dir / "latest.tmp.png"
    plot(results, tmp_png)
    tmp_png.replace(paths["png"])
    if image_copy:
        image_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths["png"], image_copy)
    return paths


def print_summary(results: dict) -> None:
    print()
    print("\n".join(runs_table(results["runs"])))
    print()
    print("\n".join(ray_phase_table(results)))
    print("\n".join(details(results)))
    print()
    for key, label, comparison, target in TARGETS:
        sign = "<=" if comparison == "le" else ">="
        print(f"{key:36} {_fmt(results.get(key), 3):>8}  target {sign} {target:<4g} {results['verdicts'][key]:14} {label}")


def elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 2)
