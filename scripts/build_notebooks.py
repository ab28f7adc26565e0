#!/usr/bin/env python3
"""Build the lab notebooks from their sources in notebooks/src/*.txt.

The .ipynb files are the product; the sources exist so that a notebook is reviewed as
text and its cell metadata (tags, slide types) stays consistent. A source file is a list
of cells, each opened by a header line::

    %% md                      a Markdown cell
    %% code tags=parameters    a code cell with tags (comma-separated)
    %% code slide=skip         slide type override (slide, subslide, fragment, skip, notes)

Usage:
  build_notebooks.py                  rebuild every notebook, keeping the outputs of the
                                      command notebooks (01-03) whose sources did not change
  build_notebooks.py --execute 01 02  also re-run those in a throw-away DTRAIN_HOME to
                                      refresh their committed outputs (starts MinIO/Ray)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = NOTEBOOKS / "src"
# Command notebooks keep outputs (checked by nbval); compute notebooks are committed stripped.
KEEP_OUTPUTS = ("01_cluster", "02_kuberay", "03_minio")
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (dtrain)", "language": "python"}
_HEADER = re.compile(r"^%% (md|code)\b(.*)$")


def parse_source(path: Path) -> list[dict]:
    """The cells of a source file: ``{"kind", "source", "tags", "slide"}``."""
    cells, current = [], None
    for line in path.read_text().splitlines():
        match = _HEADER.match(line)
        if match:
            current = {"kind": match.group(1), "lines": [], "tags": [], "slide": None}
            for option in match.group(2).split():
                key, _, value = option.partition("=")
                if key == "tags":
                    current["tags"] = [t for t in value.split(",") if t]
                elif key == "slide":
                    current["slide"] = value
                else:
                    raise SystemExit(f"{path}: unknown cell option {option!r}")
            cells.append(current)
        elif current is None:
            if line.strip():
                raise SystemExit(f"{path}: text before the first '%% md' or '%% code' header")
        else:
            current["lines"].append(line)
    for cell in cells:
        cell["source"] = "\n".join(cell.pop("lines")).strip("\n")
    return cells


def slide_type(cell: dict) -> str:
    """Headings open a slide; plumbing is skipped; everything else continues the slide."""
    if cell["slide"]:
        return cell["slide"]
    if "remove-cell" in cell["tags"]:
        return "skip"
    if cell["kind"] == "md" and cell["source"].startswith(("# ", "## ")):
        return "slide"
    return "-"


def build(stem: str) -> nbformat.NotebookNode:
    """A fresh notebook (no outputs) from ``notebooks/src/<stem>.txt``."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for index, cell in enumerate(parse_source(SOURCES / f"{stem}.txt")):
        make = nbformat.v4.new_markdown_cell if cell["kind"] == "md" else nbformat.v4.new_code_cell
        new = make(cell["source"])
        new.id = f"{stem.split('_')[0]}-{index:03d}"  # stable ids: no diff noise between builds
        new.metadata = {"slideshow": {"slide_type": slide_type(cell)}}
        if cell["tags"]:
            new.metadata["tags"] = cell["tags"]
        nb.cells.append(new)
    return nb


def same_sources(a: nbformat.NotebookNode, b: nbformat.NotebookNode) -> bool:
    """True when two notebooks have the same cells (kind, source, metadata), outputs aside."""
    def key(nb):
        return [(c.cell_type, c.source, c.metadata.get("tags", []), c.metadata.get("slideshow"))
                for c in nb.cells]
    return key(a) == key(b)


def carry_outputs(new: nbformat.NotebookNode, old: nbformat.NotebookNode) -> bool:
    """Copy the outputs of ``old`` onto ``new`` when their code cells are identical (only
    Markdown changed), so editing prose does not force a re-run; False otherwise."""
    def code(nb):
        return [c for c in nb.cells if c.cell_type == "code"]
    pairs = list(zip(code(new), code(old), strict=False))
    if len(code(new)) != len(code(old)) or any(
            (a.source, a.metadata.get("tags", [])) != (b.source, b.metadata.get("tags", [])) for a, b in pairs):
        return False
    for fresh, done in pairs:
        fresh.outputs, fresh.execution_count = done.outputs, done.execution_count
    return True


def execute(nb: nbformat.NotebookNode, home: Path) -> None:
    """Run a notebook in place with nbclient, in the state folder ``home``."""
    from nbclient import NotebookClient

    os.environ["DTRAIN_HOME"] = str(home)
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS"):
        os.environ.pop(key, None)
    NotebookClient(nb, timeout=900, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()


def stop_services(home: Path) -> None:
    """Stop the Ray cluster and MinIO that an --execute run started in ``home``."""
    env = {**os.environ, "DTRAIN_HOME": str(home)}
    for group in ("cluster", "s3"):
        subprocess.run([sys.executable, "-m", "dtrain", group, "down"], env=env, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", nargs="*", default=[], metavar="NN",
                        help="re-run these command notebooks (01 02 03) to refresh their outputs")
    args = parser.parse_args()
    stems = sorted(p.stem for p in SOURCES.glob("0*.txt"))
    home = Path(tempfile.mkdtemp(prefix="nb-build-")) if args.execute else None
    try:
        for stem in stems:
            path = NOTEBOOKS / f"{stem}.ipynb"
            nb = build(stem)
            old = nbformat.read(path, as_version=4) if path.exists() else None
            if stem in KEEP_OUTPUTS and stem.split("_")[0] in args.execute:
                execute(nb, home)
                state = "executed"
            elif stem in KEEP_OUTPUTS and old is not None and carry_outputs(nb, old):
                executed = any(c.get("execution_count") for c in old.cells)
                state = "code unchanged, " + ("outputs kept" if executed else "NOT EXECUTED yet")
            else:
                state = "built without outputs" + (" (sources changed: run --execute)"
                                                   if stem in KEEP_OUTPUTS else "")
            nbformat.validate(nb)
            nbformat.write(nb, path)
            print(f"{path.relative_to(ROOT)}: {len(nb.cells)} cells, {state}")
    finally:
        if home:
            stop_services(home)
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
