"""Notebook plumbing: run a shell command so that a failure fails the notebook (IPython's
``!cmd`` ignores the exit status), show what a real cluster prints when we cannot run it
here, and record results that tests and later notebooks read back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dtrain.config import PROJECT_ROOT, state_dir, write_json_atomic
from dtrain.errors import ConfigError

MODES = ("local", "kubernetes", "ray")
# Where each mode's cluster is found; checked before the first step runs.
MODE_ENV = {"kubernetes": "KUBECONFIG", "ray": "RAY_ADDRESS"}


class ShellOutput(str):
    """A command's output. It was already printed while the command ran, so IPython
    must not echo it again as the cell's result."""

    def _ipython_display_(self) -> None:
        pass


def _env() -> dict[str, str]:
    """The environment for commands: the venv's bin first, so ``dtrain``/``ray`` resolve to
    the kernel's own even when the kernel was started without activating the venv."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def sh(command: str, check: bool = True, echo: bool = True, timeout: float | None = None) -> ShellOutput:
    """Run ``command`` in bash from the repository root, print its output as it comes
    (unless ``echo`` is False), return it; raise ``CalledProcessError`` on a non-zero exit
    when ``check`` (the default), after printing the output even when not echoing."""
    proc = subprocess.Popen(["bash", "-o", "pipefail", "-c", command], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=_env(), cwd=PROJECT_ROOT)
    lines = []
    for line in proc.stdout:
        if echo:
            print(line, end="", flush=True)
        lines.append(line)
    code = proc.wait(timeout=timeout)
    output = ShellOutput("".join(lines))
    if check and code != 0:
        if not echo:
            print(output, end="")
        raise subprocess.CalledProcessError(code, command, output=output)
    return output


def project_root() -> Path:
    """The repository root (commands use repo-relative paths such as ``manifests/``)."""
    return PROJECT_ROOT


def check_mode(mode: str) -> None:
    """Validate the ``mode`` parameter and that its cluster is configured."""
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
    needed = MODE_ENV.get(mode)
    if needed and not os.environ.get(needed):
        raise ConfigError(f"mode '{mode}' needs {needed} set in the environment of the notebook")
    print(f"mode: {mode}" + (f" ({needed}={os.environ[needed]})" if needed else " (this machine only)"))


def on_cluster(mode: str, command: str, example_output: str) -> ShellOutput | None:
    """Run ``command`` when ``mode`` is kubernetes; otherwise print it with the output a
    real cluster prints, labelled so that nobody mistakes it for a local result."""
    if mode == "kubernetes":
        return sh(command)
    print(f"$ {command}\n# on a real cluster this prints (example, not run here):")
    print("\n".join(f"  {line}" for line in example_output.strip("\n").splitlines()))
    return None


def show_image(image, width: int = 700):
    """Display a PNG file (a figure the library wrote, a screenshot) or a matplotlib Figure
    (ours are built without pyplot, so IPython would only print their repr)."""
    from IPython.display import Image

    if hasattr(image, "savefig"):
        from dtrain.plots import png_bytes

        return Image(data=png_bytes(image), width=width)
    return Image(filename=str(image), width=width)


def results_path(notebook: str) -> Path:
    """Where a notebook records its results: ``$DTRAIN_NB_RESULTS`` or .dtrain/notebooks/."""
    folder = Path(os.environ.get("DTRAIN_NB_RESULTS") or state_dir() / "notebooks")
    return folder / f"{notebook}.json"


def record(notebook: str, **results) -> Path:
    """Merge ``results`` into the notebook's results file (read back by tests and the runner)."""
    path = results_path(notebook)
    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(results)
    write_json_atomic(path, current, mode=0o644)
    return path


def recorded(notebook: str) -> dict:
    """The results an earlier notebook recorded; ConfigError when it has not run yet."""
    path = results_path(notebook)
    if not path.exists():
        raise ConfigError(f"no results of notebook {notebook} at {path}: run it first")
    return json.loads(path.read_text())


_JOB_LINES = ("submitted job", "dtrain: ", "Error: ")
_last_job_line = [""]


def job_echo(line: str) -> None:
    """A quiet ``echo`` for ``dtrain.submit`` in a notebook: the submission, one line per
    epoch, and errors; the full log stays in ``ray job logs`` and the dashboard."""
    if "DTRAIN_EPOCH " in line:
        row = json.loads(line.split("DTRAIN_EPOCH ", 1)[1])
        line = (f"epoch {row['epoch']}/{row['epochs']}: test accuracy {row['test_accuracy']:.2%}, "
                f"train loss {row['train_loss']:.3f}, {row['epoch_time_s']:.0f} s")
    elif not any(marker in line for marker in _JOB_LINES):
        return
    if line != _last_job_line[0]:  # rank 0's lines can arrive twice through Ray's log monitor
        print(line, flush=True)
    _last_job_line[0] = line


def outside_event_loop(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, in a helper thread when this thread already runs an asyncio
    loop (a Jupyter kernel does), so that code calling ``asyncio.run`` works in a cell."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kwargs)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args, **kwargs).result()
