#!/usr/bin/env python3
"""Build the exam deck (``make slides``): one reveal.js presentation, slides/index.html,
from the executed notebooks of the newest ``runs/<timestamp>/`` (``make demo``), or the
committed notebooks when no run has all five.

Slide breaks come from each cell's ``slideshow`` metadata, set by build_notebooks.py:
every H1/``## Step`` heading opens a slide, plumbing and parameters are skipped.

Offline: reveal.js and require.js are served from slides/ itself. They come from npm
(``reveal.js@4``, ``requirejs``) installed once into tools/slides/ (git-ignored); when
npm cannot reach its registry the deck falls back to nbconvert's CDN URLs and says so.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "slides"
NPM_DIR = ROOT / "tools" / "slides"
# nbconvert 7's reveal template is written for reveal.js 4 (dist/ + plugin/notes).
NPM_PACKAGES = ("reveal.js@4.6.0", "requirejs@2.3.7")
STEMS = ("01_cluster", "02_kuberay", "03_minio", "04_train", "05_evaluate")
SKIP_TAGS = {"parameters", "injected-parameters", "remove-cell"}


def newest_run() -> Path | None:
    """The newest runs/<timestamp>/ holding all five executed notebooks."""
    runs = sorted((ROOT / "runs").glob("*/"), reverse=True)
    return next((r for r in runs if all((r / f"{s}.ipynb").exists() for s in STEMS)), None)


def merged_notebook(folder: Path) -> nbformat.NotebookNode:
    """The five notebooks as one, skipping parameter cells and papermill's injected ones."""
    deck = nbformat.v4.new_notebook()
    for stem in STEMS:
        nb = nbformat.read(folder / f"{stem}.ipynb", as_version=4)
        deck.metadata = deck.metadata or nb.metadata
        for cell in nb.cells:
            if SKIP_TAGS & set(cell.metadata.get("tags", [])):
                cell.metadata["slideshow"] = {"slide_type": "skip"}
            deck.cells.append(cell)
    return deck


def local_reveal() -> tuple[Path, Path] | None:
    """(reveal.js folder, require.js file) from tools/slides/, installing them with npm
    the first time; None when npm is missing or offline."""
    reveal = NPM_DIR / "node_modules" / "reveal.js"
    require = NPM_DIR / "node_modules" / "requirejs" / "require.js"
    if not (reveal / "dist" / "reveal.js").exists() or not require.exists():
        if not shutil.which("npm"):
            return None
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NPM_DIR),
                               *NPM_PACKAGES], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"make_slides: npm install failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
    return reveal, require


def build(folder: Path, out: Path = OUT) -> Path:
    """Write ``out``/index.html (+ the reveal.js assets when available); return its path."""
    from nbconvert import SlidesExporter

    out.mkdir(parents=True, exist_ok=True)
    exporter = SlidesExporter(embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True)
    assets = local_reveal()
    if assets:
        reveal, require = assets
        for part in ("dist", "plugin"):
            shutil.copytree(reveal / part, out / "reveal.js" / part, dirs_exist_ok=True)
        shutil.copy2(require, out / "require.js")
        exporter.reveal_url_prefix = "reveal.js"
        exporter.require_js_url = "require.js"
    else:
        print("make_slides: WARNING: no local reveal.js; the deck loads it from a CDN (needs internet)")
    body, _ = exporter.from_notebook_node(merged_notebook(folder))
    index = out / "index.html"
    index.write_text(body)
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path,
                        help="folder with the five executed notebooks (default: newest complete run)")
    parser.add_argument("--out", type=Path, default=OUT, help="output folder (default: slides/)")
    args = parser.parse_args(argv)
    source = args.source or newest_run()
    if source is None:
        source = ROOT / "notebooks"
        print("make_slides: no complete run under runs/ (make demo); using the committed notebooks, "
              "whose 04/05 have no outputs")
    missing = [s for s in STEMS if not (source / f"{s}.ipynb").exists()]
    if missing:
        print(f"make_slides: error: {source} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    index = build(source, args.out)
    print(f"make_slides: {index} from {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
