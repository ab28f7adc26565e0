#!/usr/bin/env python3
"""Enforce the notebooks' output policy and skeleton (see notebooks/README.md).

* Command notebooks (01-03) are committed WITH outputs: every code cell executed, in
  order, none failed. ``pytest --nbval`` compares a re-run against them.
* Compute notebooks (04-05) are committed WITHOUT outputs: papermill runs them with
  small parameters and the tests assert the metrics they record.
* Every notebook follows one skeleton: H1 title, "Time to complete", "What you will
  learn", a ``parameters`` cell near the top with a comment on each parameter,
  ``## Step N:`` headings numbered from 1 including a clean-up step, a summary and a
  "What next", and a final code cell that asserts results. Code cells stay short.
* The .ipynb files match their sources in notebooks/src/ (scripts/build_notebooks.py).

Usage: check_notebooks.py [NOTEBOOK...]   (default: notebooks/0*.ipynb; exit 1 on any problem)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_notebooks  # noqa: E402 - sibling script

ROOT = build_notebooks.ROOT
NOTEBOOKS = build_notebooks.NOTEBOOKS
EXPECTED = ("01_cluster", "02_kuberay", "03_minio", "04_train", "05_evaluate")
MAX_CODE_LINES = 15
PARAMETERS_WITHIN = 3  # the parameters cell is one of the first three code cells
_STEP = re.compile(r"^## Step (\d+): ", re.MULTILINE)


def _code_cells(nb) -> list[tuple[int, dict]]:
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def skeleton_problems(nb) -> list[str]:
    """Title, header, parameters, steps, clean-up, summary, final assertions, short cells."""
    found = []
    first = nb.cells[0] if nb.cells else None
    if not first or first.cell_type != "markdown" or not first.source.startswith("# "):
        found.append("the first cell must be Markdown starting with an H1 title")
    elif "Time to complete" not in first.source or "What you will learn" not in first.source:
        found.append("the first cell must say 'Time to complete' and 'What you will learn'")
    code = _code_cells(nb)
    params = [i for i, c in code if "parameters" in c.metadata.get("tags", [])]
    if len(params) != 1 or params[0] not in [i for i, _ in code[:PARAMETERS_WITHIN]]:
        found.append(f"exactly one 'parameters'-tagged cell among the first {PARAMETERS_WITHIN} code cells")
    else:
        for line in nb.cells[params[0]].source.splitlines():
            if "=" in line and "#" not in line:
                found.append(f"parameter without a comment: {line.strip()!r}")
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    steps = [int(n) for n in _STEP.findall(markdown)]
    if len(steps) < 3 or steps != list(range(1, len(steps) + 1)):
        found.append(f"'## Step N: ' headings must be numbered 1, 2, 3… (found {steps})")
    if not re.search(r"^## Step \d+: Clean-up", markdown, re.MULTILINE):
        found.append("no '## Step N: Clean-up' heading")
    for heading in ("## Summary", "## What next"):
        if not re.search(rf"^{heading}\b", markdown, re.MULTILINE):
            found.append(f"no '{heading}' heading")
    if not nb.cells or nb.cells[-1].cell_type != "code" or "assert " not in nb.cells[-1].source:
        found.append("the last cell must be a code cell that asserts the results")
    for i, cell in code:
        lines = len(cell.source.splitlines())
        if lines > MAX_CODE_LINES:
            found.append(f"cell {i}: {lines} lines of code (max {MAX_CODE_LINES}; move it to lib/)")
    return found


def output_problems(stem: str, nb) -> list[str]:
    """Command notebooks: executed in order without errors. Compute notebooks: stripped."""
    found = []
    code = _code_cells(nb)
    if stem in build_notebooks.KEEP_OUTPUTS:
        counts = [c.execution_count for _, c in code]
        if None in counts:
            found.append(f"cell {code[counts.index(None)][0]}: not executed (run build_notebooks.py --execute)")
        elif counts != sorted(counts):
            found.append("cells were executed out of order")
        for i, cell in code:
            if any(o.output_type == "error" for o in cell.outputs):
                found.append(f"cell {i}: the committed output is an error")
    else:
        for i, cell in code:
            if cell.outputs or cell.execution_count is not None:
                found.append(f"cell {i}: has outputs (compute notebooks are committed stripped)")
    return found


def sync_problems(stem: str, nb) -> list[str]:
    """The notebook must be what its source in notebooks/src/ builds."""
    if not (build_notebooks.SOURCES / f"{stem}.txt").exists():
        return [f"no source notebooks/src/{stem}.txt"]
    if not build_notebooks.same_sources(build_notebooks.build(stem), nb):
        return ["differs from its source: run scripts/build_notebooks.py"]
    return []


def problems(path: Path, check_sync: bool = True) -> list[str]:
    """Every policy violation of one notebook, as readable lines."""
    try:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
    except Exception as exc:  # noqa: BLE001 - any read failure is a finding, not a crash
        return [f"not a valid notebook: {exc}"]
    found = []
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        found.append("kernelspec must be 'python3' (the venv's kernel)")
    found += skeleton_problems(nb) + output_problems(path.stem, nb)
    if check_sync:
        found += sync_problems(path.stem, nb)
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted(NOTEBOOKS.glob("0*.ipynb"))
    report = []
    if not argv:
        missing = sorted(set(EXPECTED) - {p.stem for p in paths})
        report += [f"notebooks/{stem}.ipynb: missing" for stem in missing]
    for path in paths:
        report += [f"{path}: {problem}" for problem in problems(path)]
    for line in report:
        print(f"check_notebooks: {line}")
    print(f"check_notebooks: {len(paths)} notebooks, {len(report)} problem(s)")
    return 1 if report else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
