"""The lab notebooks: output policy, the failing-command harness, nbval on the command
notebooks, and the whole 01→05 chain run by the demo runner with small parameters.

The slow tests start their own MinIO and Ray cluster in a temporary DTRAIN_HOME and stop
them afterwards; they never touch the user's .dtrain/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dtrain import nbtools

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_notebooks  # noqa: E402 - a script, imported for its functions

pytestmark = pytest.mark.notebooks
CLEAN_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CA_BUNDLE",
                  "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "KUBECONFIG", "DTRAIN_NB_RESULTS")


def isolated_env(home: Path) -> dict[str, str]:
    """The environment of a notebook run: its own state folder, no inherited endpoints."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV_KEYS}
    env.update(DTRAIN_HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def stop_services(env: dict[str, str]) -> None:
    for group in ("cluster", "s3"):
        subprocess.run([sys.executable, "-m", "dtrain", group, "down"], env=env, check=False,
                       capture_output=True)


def tiny_notebook(path: Path, body: str, outputs: bool = False) -> Path:
    """A notebook with the full skeleton around one code cell ``body``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    params = nbformat.v4.new_code_cell("mode = 'local'  # where to run")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# T\n\nTime to complete: 1 min\n\nWhat you will learn"), params,
                nbformat.v4.new_markdown_cell("## Step 1: a\n\n## Step 2: b\n\n## Step 3: Clean-up\n\n"
                                              "## Summary\n\n## What next"),
                nbformat.v4.new_code_cell(body)]
    if outputs:
        nb.cells[-1].outputs = [nbformat.v4.new_output("stream", text="hi\n")]
        nb.cells[-1].execution_count = 1
    nbformat.write(nb, path)
    return path


# --- policy -----------------------------------------------------------------------------------
def test_committed_notebooks_follow_the_policy():
    paths = sorted((REPO / "notebooks").glob("0*.ipynb"))
    assert [p.stem for p in paths] == list(check_notebooks.EXPECTED)
    report = {p.name: check_notebooks.problems(p) for p in paths}
    assert report == {p.name: [] for p in paths}


def test_policy_check_catches_each_violation(tmp_path):
    good = tiny_notebook(tmp_path / "04_train.ipynb", "from dtrain.nbtools import sh\nassert sh('true') == ''")
    assert check_notebooks.problems(good, check_sync=False) == []

    with_outputs = tiny_notebook(tmp_path / "05_evaluate.ipynb", "assert True", outputs=True)
    assert any("has outputs" in p for p in check_notebooks.problems(with_outputs, check_sync=False))

    long_cell = tiny_notebook(tmp_path / "04_train.ipynb", "\n".join(["x = 1"] * 16) + "\nassert x")
    assert any("17 lines" in p for p in check_notebooks.problems(long_cell, check_sync=False))

    no_assert = tiny_notebook(tmp_path / "04_train.ipynb", "print('done')")
    assert any("asserts the results" in p for p in check_notebooks.problems(no_assert, check_sync=False))

    nb = nbformat.read(good, as_version=4)
    nb.cells[1].metadata["tags"] = []
    nb.cells[2].source = "## Step 1: a\n\n## Step 3: b"
    nbformat.write(nb, tmp_path / "bad.ipynb")
    found = check_notebooks.problems(tmp_path / "bad.ipynb", check_sync=False)
    assert any("parameters" in p for p in found) and any("numbered" in p for p in found)
    assert any("Clean-up" in p for p in found)

    unexecuted = tiny_notebook(tmp_path / "01_cluster.ipynb", "assert True")
    assert any("not executed" in p for p in check_notebooks.problems(unexecuted, check_sync=False))


def test_policy_check_script_exits_non_zero_on_a_bad_notebook(tmp_path):
    bad = tiny_notebook(tmp_path / "05_evaluate.ipynb", "assert True", outputs=True)
    done = subprocess.run([sys.executable, str(REPO / "scripts/check_notebooks.py"), str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 1 and "has outputs" in done.stdout


# --- the shell helper -------------------------------------------------------------------------
def test_sh_returns_output_and_raises_on_failure(capsys):
    assert nbtools.sh("echo one; echo two") == "one\ntwo\n"
    assert capsys.readouterr().out == "one\ntwo\n"
    with pytest.raises(subprocess.CalledProcessError) as failed:
        nbtools.sh("echo before; exit 3", echo=False)
    assert failed.value.returncode == 3 and "before" in capsys.readouterr().out
    with pytest.raises(subprocess.CalledProcessError):
        nbtools.sh("false | cat")  # pipefail: a failure inside a pipe counts


def test_on_cluster_labels_examples_and_check_mode_rejects_bad_input(capsys, monkeypatch):
    assert nbtools.on_cluster("local", "kubectl get nodes", "NAME STATUS") is None
    out = capsys.readouterr().out
    assert "$ kubectl get nodes" in out and "on a real cluster this prints" in out
    from dtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown mode"):
        nbtools.check_mode("cloud")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    with pytest.raises(ConfigError, match="KUBECONFIG"):
        nbtools.check_mode("kubernetes")


def test_record_merges_and_recorded_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("DTRAIN_NB_RESULTS", str(tmp_path))
    nbtools.record("04_train", run_id="r1")
    nbtools.record("04_train", test_accuracy=0.9)
    assert nbtools.recorded("04_train") == {"run_id": "r1", "test_accuracy": 0.9}
    from dtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="run it first"):
        nbtools.recorded("05_evaluate")


# --- the harness can fail -----------------------------------------------------------------------
def test_a_failing_shell_command_fails_the_notebook_under_papermill(tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path / "home"))
    failing = tiny_notebook(tmp_path / "fail.ipynb", "from dtrain.nbtools import sh\nsh('dtrain no-such-command')\n"
                            "assert False, 'not reached'")
    with pytest.raises(papermill.PapermillExecutionError) as failed:
        papermill.execute_notebook(str(failing), str(tmp_path / "fail.out.ipynb"), kernel_name="python3",
                                   progress_bar=False)
    assert failed.value.ename == "CalledProcessError" and "returned non-zero exit status 2" in failed.value.evalue
    passing = tiny_notebook(tmp_path / "pass.ipynb", "from dtrain.nbtools import sh\nassert 'ok' in sh('echo ok')")
    papermill.execute_notebook(str(passing), str(tmp_path / "pass.out.ipynb"), kernel_name="python3",
                               progress_bar=False)


# --- the real notebooks ------------------------------------------------------------------------
@pytest.mark.slow
def test_command_notebooks_reproduce_their_committed_outputs(tmp_path):
    env = isolated_env(tmp_path / "home")
    notebooks = [f"notebooks/{n}.ipynb" for n in ("01_cluster", "02_kuberay", "03_minio")]
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval",
                               "--nbval-current-env", "--nbval-sanitize-with", "notebooks/sanitize.cfg",
                               *notebooks], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop_services(env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


@pytest.mark.slow
def test_demo_runner_executes_01_to_05_and_the_metrics_hold(tmp_path):
    env = isolated_env(tmp_path / "home")
    out = tmp_path / "run"
    command = [sys.executable, "scripts/run_notebooks.py", "--mode", "local", "--out", str(out),
               "-p", "epochs=1", "-p", "compare_workers=[1]", "-p", "min_accuracy=0.8"]
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        stop_services(env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary] == ["passed"] * 5
    assert (out / "index.html").exists() and (out / "04_train.html").stat().st_size > 10_000
    results = {p.stem: json.loads(p.read_text()) for p in (out / "results").glob("*.json")}
    assert results["01_cluster"]["scripts_checked"] >= 6
    assert results["02_kuberay"] == {"alive_nodes": 3, "cpus": 8}
    assert results["03_minio"]["objects"] == 5 and results["03_minio"]["test_images"] == 10000
    train = results["04_train"]
    # One epoch of this CNN on Fashion-MNIST: 87-89% measured; far below means broken training.
    assert 0.80 <= train["test_accuracy"] <= 0.95 and len(train["history"]) == 1
    assert [c["workers"] for c in train["comparison"]] == [1] and train["comparison"][0]["test_accuracy"] > 0.7
    evaluation = results["05_evaluate"]
    assert evaluation["run_id"] == train["run_id"] and evaluation["confusion_total"] == 10000
    assert evaluation["accuracy"] == pytest.approx(train["test_accuracy"], abs=1e-4)


def test_job_echo_keeps_one_line_per_epoch(capsys):
    epoch = ('(RayTrainWorker pid=1) DTRAIN_EPOCH {"epoch": 1, "epochs": 2, "test_accuracy": 0.885, '
             '"train_loss": 0.6951, "epoch_time_s": 44.1}')
    for line in ("submitted job j1 (run r1): python -m dtrain train", "INFO worker.py:1 -- Connecting",
                 epoch, epoch, "dtrain: error: dataset missing"):
        nbtools.job_echo(line)
    assert capsys.readouterr().out.splitlines() == [
        "submitted job j1 (run r1): python -m dtrain train",
        "epoch 1/2: test accuracy 88.50%, train loss 0.695, 44 s",
        "dtrain: error: dataset missing"]


def test_outside_event_loop_runs_asyncio_code_inside_a_running_loop():
    import asyncio

    def uses_asyncio_run():
        return asyncio.run(asyncio.sleep(0, result=42))

    async def inside_a_loop():
        return nbtools.outside_event_loop(uses_asyncio_run)

    assert asyncio.run(inside_a_loop()) == 42
    assert nbtools.outside_event_loop(uses_asyncio_run) == 42


def test_demo_runner_stops_at_a_failing_notebook_with_diagnostics(tmp_path):
    """05 alone, in an empty state folder, has no run of 04 to evaluate: it must fail fast."""
    env = isolated_env(tmp_path / "home")
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "scripts/run_notebooks.py", "--only", "05", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "05_evaluate FAILED at cell" in done.stderr and "run it first" in done.stderr
    assert "$ dtrain s3 status" in done.stderr and "$ dtrain cluster status" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["notebook"], r["status"]) for r in summary] == [("05_evaluate", "failed")]
    assert "failed" in (out / "index.html").read_text()
