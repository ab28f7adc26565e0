"""The benchmark script works and writes what the docs promise. No timing assertions:
benchmarks are not tests. The smoke run trains on a sliver of the data without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.append(str(BENCH))

import harness  # noqa: E402
import memory  # noqa: E402
import rayruns  # noqa: E402
import report  # noqa: E402

REQUIRED_KEYS = ("ray2_over_plain_end_to_end", "ray2_over_plain_per_epoch", "examples_over_ours_time_to_target",
                 "minio_over_disk_load", "submit_to_first_step_s", "peak_rss_gib", "machine", "date", "runs",
                 "data_path", "verdicts", "mnist_note")


def test_time_to_target_reads_the_first_evaluation_at_or_above_target():
    curve = harness.Curve("x", points=[{"train_s": 1.0, "accuracy": 0.80}, {"train_s": 2.0, "accuracy": 0.905},
                                       {"train_s": 3.0, "accuracy": 0.89}])
    assert curve.time_to(0.90) == 2.0
    assert curve.time_to(0.95) is None
    assert curve.accuracy_at(1.5) == 0.80
    assert curve.accuracy_at(0.5) is None
    assert curve.best() == 0.905


def test_eval_steps_spread_over_the_epoch_and_always_include_its_end():
    assert harness.eval_steps(235, 4) == {59, 118, 177, 235}
    assert harness.eval_steps(3, 8) == {1, 2, 3}


def test_verdicts_compare_in_the_right_direction():
    assert report.verdict(1.4, "le", 1.5) == "met"
    assert report.verdict(1.6, "le", 1.5) == "MISSED"
    assert report.verdict(3.9, "ge", 4.0) == "MISSED"
    assert report.verdict(5.0, "ge", 4.0, floor=True) == "met (lower bound)"
    assert report.verdict(None, "le", 1.0) == "not measured"
    assert report.safe_ratio(3.0, 2.0) == 1.5
    assert report.safe_ratio(3.0, 0) is None


def test_ray_result_becomes_a_curve_in_seconds_since_submit():
    result = {"timings": {"submit_to_first_step_s": 6.0, "total_s": 40.0},
              "history": [{"epoch": 1, "test_accuracy": 0.88, "train_time_s": 15.0, "since_submit_s": 23.0},
                          {"epoch": 2, "test_accuracy": 0.905, "train_time_s": 14.0, "since_submit_s": 38.5}]}
    run = rayruns.normalize(result, workers=2, wall_s=41.0)
    # Evaluation and checkpoint time are left out, as in the plain run: 6 + 15, then + 14.
    assert [p["wall_s"] for p in run["curve"]] == [21.0, 35.0]
    assert run["per_epoch_s"] == 14.5
    assert run["end_to_end_s"] == 40.0
    assert rayruns.time_to_target(run, 0.90) == 35.0


def test_peak_sampler_sums_a_process_tree(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50 * 2**20); time.sleep(30)"])
    try:
        time.sleep(1.0)
        with memory.PeakSampler(minio_pid=child.pid, ray_temp_dir=None, interval_s=0.1) as sampler:
            time.sleep(0.5)
        result = sampler.result()
    finally:
        child.kill()
        child.wait()
    assert result["samples"] >= 2 and result["peak_processes"] == 1
    assert result["peak_rss_gib"] >= 50 / 1024  # the child's 50 MiB buffer is resident
    assert 0 < result["peak_pss_gib"] <= result["peak_rss_gib"]
    assert result["top_at_peak"][0]["rss_mib"] >= 50


@pytest.mark.slow
def test_smoke_run_writes_json_table_and_plot(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["DTRAIN_HOME"] = str(tmp_path / "home")
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "latest.json").read_text())
    assert set(REQUIRED_KEYS) <= results.keys()
    assert results["mode"] == "smoke"
    assert {run["name"] for run in results["runs"]} == {"plain", "ours", "pytorch-examples", "ray-example"}
    for run in results["runs"]:
        assert run["curve"], run["name"]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in run["curve"])
        assert run["per_epoch_s"] > 0
    assert results["data_path"]["minio_median_s"] > 0 and results["data_path"]["disk_median_s"] > 0
    assert results["minio_over_disk_load"] == pytest.approx(
        results["data_path"]["minio_median_s"] / results["data_path"]["disk_median_s"], rel=0.01)
    # No Ray in smoke mode: those ratios are reported as not measured, not invented.
    assert results["ray2_over_plain_per_epoch"] is None
    assert results["verdicts"]["ray2_over_plain_per_epoch"] == "not measured"
    assert "| plain |" in (out / "latest.md").read_text()
    assert (out / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "minio_over_disk_load" in proc.stdout


def test_bad_arguments_exit_2_with_one_line():
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "not allowed with" in proc.stderr
