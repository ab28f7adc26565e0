#!/usr/bin/env python3
"""Run the lab notebooks 01→05 with papermill (``make demo``).

Each notebook is executed in order in the ``python3`` kernel with the demo's small
parameters; the executed copies, an HTML page of each and an index.html go to
``runs/<UTC timestamp>/``. The first failing notebook stops the run with exit code 1,
after printing the failing cell and the diagnostics (``dtrain s3 status``,
``dtrain cluster status``, the tails of the logs under the state folder).

Examples:
  run_notebooks.py --mode local
  run_notebooks.py --only 04 05 -p epochs=1 -p compare_workers=[2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "python3"
# Small enough for 2 cores and 15 minutes; a notebook only gets the ones it declares.
DEMO_PARAMETERS = {"dataset": "fashion-mnist", "workers": 2, "epochs": 2,
                   "compare_workers": [2, 8], "compare_epochs": 1, "min_accuracy": 0.80}
LOG_TAIL_LINES = 15


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def parse_parameter(text: str) -> tuple[str, object]:
    """``name=value`` with the value read as YAML (numbers, lists, booleans, strings)."""
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, yaml.safe_load(value)


def declared_parameters(path: Path) -> set[str]:
    """The names assigned in the notebook's ``parameters`` cell."""
    import papermill

    return set(papermill.inspect_notebook(str(path)))


def run_one(path: Path, out: Path, parameters: dict) -> dict:
    """Execute one notebook; return its record (name, seconds, status, error)."""
    import papermill

    wanted = {k: v for k, v in parameters.items() if k in declared_parameters(path)}
    started = time.monotonic()
    record = {"notebook": path.stem, "parameters": wanted, "output": str(out)}
    try:
        papermill.execute_notebook(str(path), str(out), parameters=wanted, kernel_name=KERNEL,
                                   cwd=str(NOTEBOOKS), progress_bar=False, log_output=False)
        record["status"] = "passed"
    except papermill.PapermillExecutionError as exc:
        record.update(status="failed", cell=exc.cell_index, error=f"{exc.ename}: {exc.evalue}",
                      traceback=_strip_ansi("\n".join(exc.traceback[-6:])))
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def diagnostics() -> str:
    """What to look at when a notebook fails: service status and log tails."""
    from dtrain.config import state_dir

    parts = []
    for command in (["s3", "status"], ["cluster", "status"]):
        done = subprocess.run([sys.executable, "-m", "dtrain", *command], capture_output=True, text=True,
                              check=False)
        parts.append(f"$ dtrain {' '.join(command)}\n{(done.stdout + done.stderr).strip()}")
    logs = sorted(state_dir().glob("*.log")) + sorted(state_dir().glob("ray/logs/*.log"))
    for log in logs:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        parts.append(f"--- tail of {log}\n" + "\n".join(tail))
    return "\n\n".join(parts)


def write_html(records: list[dict], out_dir: Path) -> Path:
    """An HTML page per executed notebook plus index.html linking them."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter()
    rows = []
    for rec in records:
        page = f"{rec['notebook']}.html"
        body, _ = exporter.from_notebook_node(nbformat.read(rec["output"], as_version=4))
        (out_dir / page).write_text(body)
        note = f" (cell {rec['cell']}: {rec['error']})" if rec["status"] == "failed" else ""
        rows.append(f"<tr><td><a href='{page}'>{rec['notebook']}</a></td><td>{rec['status']}{note}</td>"
                    f"<td>{rec['seconds']} s</td></tr>")
    total = sum(r["seconds"] for r in records)
    index = out_dir / "index.html"
    index.write_text("<!doctype html><meta charset='utf-8'><title>dtrain lab run</title>"
                     f"<h1>dtrain lab run {out_dir.name}</h1><table border='1' cellpadding='4'>"
                     "<tr><th>notebook</th><th>status</th><th>time</th></tr>" + "".join(rows) +
                     f"</table><p>total {total:.0f} s</p>")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["local", "kubernetes", "ray"], default="local",
                        help="passed to every notebook (default: local)")
    parser.add_argument("-p", "--parameter", action="append", type=parse_parameter, default=[],
                        metavar="NAME=VALUE", help="override a demo parameter (repeatable)")
    parser.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. 04 05")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<UTC timestamp>)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML report")
    args = parser.parse_args(argv)

    paths = sorted(NOTEBOOKS.glob("0*.ipynb"))
    if args.only:
        paths = [p for p in paths if p.stem.split("_")[0] in args.only]
    if not paths:
        print("run_notebooks: no notebook matches", file=sys.stderr)
        return 2
    out_dir = args.out or ROOT / "runs" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The notebooks record their results here (dtrain.nbtools.record), next to the copies.
    os.environ["DTRAIN_NB_RESULTS"] = str(out_dir / "results")
    parameters = {**DEMO_PARAMETERS, "mode": args.mode, **dict(args.parameter)}
    records, failed = [], None
    for path in paths:
        print(f"run_notebooks: {path.name} ...", flush=True)
        rec = run_one(path, out_dir / path.name, parameters)
        records.append(rec)
        print(f"run_notebooks: {path.name} {rec['status']} in {rec['seconds']} s", flush=True)
        if rec["status"] == "failed":
            failed = rec
            break
    (out_dir / "summary.json").write_text(json.dumps(records, indent=2, default=str))
    if not args.no_html:
        print(f"run_notebooks: report {write_html(records, out_dir)}")
    print(f"run_notebooks: executed notebooks in {out_dir} ({sum(r['seconds'] for r in records):.0f} s)")
    if failed:
        print(f"\nrun_notebooks: {failed['notebook']} FAILED at cell {failed['cell']}: {failed['error']}\n"
              f"{failed['traceback']}\n\n{diagnostics()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
