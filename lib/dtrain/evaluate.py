"""Evaluate a trained run: load its model from MinIO, score the test set, draw the
figures, and keep the report next to the model.

A run lives under ``s3://models/<run-id>/`` (written by :mod:`dtrain.train`):
``model.pt`` (state_dict), ``config.json`` (what ``model.build_model`` needs, plus the
dataset), ``metrics.json`` (per-epoch history and the final test accuracy), and
``s3://models/latest.json`` points at the newest run. Evaluation adds ``eval/`` with
``report.json`` and four PNGs, locally and in the bucket.

Evaluation is deterministic (eval mode, no dropout, no gradients, same weights and
test set), so its accuracy must equal the one the trainer recorded: the report shows
the difference, and a non-zero one means the model or the data changed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from dtrain import config
from dtrain.errors import ModelNotFoundError

MODELS_BUCKET = config.MODELS_BUCKET
LATEST_KEY = "latest.json"
WORST_MISTAKES = 16
PREDICT_BATCH = 1000
# A run id is one path segment: it becomes an S3 prefix and a local folder name.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- finding runs ---------------------------------------------------------------------------
def _read_json_object(key: str) -> dict:
    from dtrain import storage

    try:
        return json.loads(storage.get_bytes(MODELS_BUCKET, key))
    except json.JSONDecodeError as exc:
        raise ModelNotFoundError(f"s3://{MODELS_BUCKET}/{key} is not valid JSON ({exc})") from exc


def known_runs() -> list[str]:
    """Run ids that have a model in ``s3://models/``, sorted by name (ids start with a
    timestamp, so this is also oldest first). Empty when the bucket does not exist yet."""
    from dtrain import storage

    if MODELS_BUCKET not in storage.list_buckets():
        return []
    keys = (obj["key"] for obj in storage.list_objects(MODELS_BUCKET))
    return sorted({key.split("/", 1)[0] for key in keys if key.count("/") == 1 and key.endswith("/model.pt")})


def latest_run() -> str | None:
    """The run id in ``s3://models/latest.json``, or None before the first training."""
    from dtrain import storage

    if not storage.exists(MODELS_BUCKET, LATEST_KEY):
        return None
    return _read_json_object(LATEST_KEY).get("run_id")


def resolve_run(run: str = "latest") -> str:
    """Turn ``"latest"`` or a run id into a run id that has a model; else raise
    :class:`ModelNotFoundError` naming the runs that do exist."""
    from dtrain import storage

    latest = latest_run()
    run_id = latest if run == "latest" else run
    if run_id and _RUN_ID.match(run_id) and storage.exists(MODELS_BUCKET, f"{run_id}/model.pt"):
        return run_id
    runs = known_runs()
    known = ", ".join(runs) if runs else "none yet (run 'dtrain train' first)"
    raise ModelNotFoundError(f"no model for run '{run}' in s3://{MODELS_BUCKET}/: known runs: {known} "
                             f"(latest: {latest or 'none'})")


def list_runs() -> list[dict]:
    """Every run with its dataset, workers, epochs, trained accuracy and (once evaluated)
    evaluated accuracy."""
    from dtrain import storage

    latest = latest_run()
    rows = []
    for run_id in known_runs():
        row = {"run_id": run_id, "latest": run_id == latest, "dataset": None, "workers": None,
               "epochs": None, "test_accuracy": None, "eval_accuracy": None}
        for key, read in (("config.json", _config_fields), ("metrics.json", _metrics_fields),
                          ("eval/report.json", _report_fields)):
            if storage.exists(MODELS_BUCKET, f"{run_id}/{key}"):
                row.update(read(_read_json_object(f"{run_id}/{key}")))
        rows.append(row)
    return rows


def _config_fields(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in ("dataset", "workers", "epochs")}


def _metrics_fields(metrics: dict) -> dict:
    return {"test_accuracy": (metrics.get("final") or {}).get("test_accuracy")}


def _report_fields(report: dict) -> dict:
    return {"eval_accuracy": report.get("accuracy")}


# --- loading and predicting -----------------------------------------------------------------
def load_model(run_id: str):
    """``(model, config)`` for a run, read from MinIO with checksum verification; the
    model is on the CPU in eval mode."""
    import torch

    from dtrain import model as model_lib
    from dtrain import storage

    run_id = resolve_run(run_id)
    model_config = _read_json_object(f"{run_id}/config.json")
    data = storage.get_bytes(MODELS_BUCKET, f"{run_id}/model.pt")
    try:
        # weights_only: a state_dict is tensors only, so refuse to unpickle anything else.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelNotFoundError(f"model.pt of run '{run_id}' is not a torch state_dict: "
                                 f"{str(exc).splitlines()[0]}") from exc
    try:
        model = model_lib.build_model(model_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(f"config.json of run '{run_id}' does not describe a known model: "
                                 f"{exc}") from exc
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # torch lists every mismatched tensor; the first line is enough
        raise ModelNotFoundError(f"model.pt of run '{run_id}' does not fit its config.json: "
                                 f"{str(exc).splitlines()[0]}") from exc
    return model.eval(), model_config


def predict_logits(model, images, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Raw class scores (N×C float32) for a float tensor of images, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        chunks = [model(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
    return torch.cat(chunks).float().numpy()


# --- scoring --------------------------------------------------------------------------------
def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """C×C counts: row = true class, column = predicted class."""
    flat = np.bincount(labels * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def score(logits: np.ndarray, labels: np.ndarray, class_names: list[str],
          worst: int = WORST_MISTAKES) -> dict:
    """Accuracy, mean loss, per-class accuracy, confusion matrix and the most
    confident mistakes for one set of predictions."""
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = _softmax(logits)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    matrix = confusion_matrix(labels, predicted, len(class_names))
    support = matrix.sum(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    # Stable sort, so equal confidences keep test-set order and reports are reproducible.
    worst_wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:worst]
    loss = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean()
    return {
        "n_samples": int(len(labels)),
        "correct": int(np.trace(matrix)),
        "accuracy": float(np.trace(matrix) / len(labels)),
        "loss": float(loss),
        "per_class": [{"class": c, "name": name, "support": int(support[c]), "correct": int(matrix[c, c]),
                       "accuracy": float(matrix[c, c] / support[c]) if support[c] else None}
                      for c, name in enumerate(class_names)],
        "confusion_matrix": matrix.tolist(),
        "worst_mistakes": [{"index": int(i), "true": int(labels[i]), "predicted": int(predicted[i]),
                            "confidence": float(confidence[i])} for i in worst_wrong],
    }


# --- the whole step -------------------------------------------------------------------------
def load_test_set(dataset: str):
    """``(images, labels, class_names)`` of a dataset's test split, read from
    ``s3://datasets/`` (images normalised N×1×28×28 float32, labels int64)."""
    from dtrain import datasets

    images, labels = datasets.load(dataset, "test")
    return images, labels, datasets.class_names(dataset)


def evaluate(run: str = "latest", out_dir: str | Path | None = None, upload: bool = True) -> dict:
    """Evaluate a run on its dataset's test split; write report.json and the PNGs to
    ``out_dir`` (default ``.dtrain/runs/<run-id>/eval/``) and, with ``upload``, to
    ``s3://models/<run-id>/eval/``. Returns the report."""
    started = time.perf_counter()
    run_id = resolve_run(run)
    model, model_config = load_model(run_id)
    metrics = _read_json_object(f"{run_id}/metrics.json")
    dataset = model_config["dataset"]
    images, labels, class_names = load_test_set(dataset)
    report = {"run_id": run_id, "dataset": dataset, "class_names": class_names}
    report.update(score(predict_logits(model, images), labels.numpy(), class_names))
    trained = (metrics.get("final") or {}).get("test_accuracy")
    report["trained_accuracy"] = trained
    report["accuracy_difference"] = None if trained is None else report["accuracy"] - trained
    report["eval_seconds"] = round(time.perf_counter() - started, 3)

    out = Path(out_dir) if out_dir else config.state_dir() / "runs" / run_id / "eval"
    files = _render_files(report, metrics.get("history") or [], images)
    report["local_dir"] = str(out)
    report["s3_prefix"] = f"s3://{MODELS_BUCKET}/{run_id}/eval/" if upload else None
    # report.json goes last, locally and in S3: its presence means the PNGs are there too.
    files["report.json"] = json.dumps(report, indent=2).encode()
    _write_files(out, files)
    if upload:
        _upload_files(run_id, files)
    return report


def _render_files(report: dict, history: list[dict], images) -> dict[str, bytes]:
    """The four PNGs of a report, as bytes (written and uploaded unchanged)."""
    from dtrain import plots

    names = report["class_names"]
    mistakes = report["worst_mistakes"]
    pictures = images[[m["index"] for m in mistakes]].numpy() if mistakes else []
    title = f"{report['dataset']} · run {report['run_id']}"
    figures = {
        "confusion_matrix.png": plots.confusion_matrix_figure(
            np.array(report["confusion_matrix"]), names, title=f"Confusion matrix · {title}"),
        "mistakes.png": plots.mistakes_figure(pictures, mistakes, names,
                                              title=f"Most confident mistakes · {title}"),
        "per_class_accuracy.png": plots.per_class_accuracy_figure(
            [row["accuracy"] or 0.0 for row in report["per_class"]], names, overall=report["accuracy"],
            title=f"Test accuracy per class · {title}"),
        "training_curves.png": plots.training_curves_figure(history, title=f"Training curves · {title}"),
    }
    return {name: plots.png_bytes(fig) for name, fig in figures.items()}


def _write_files(out: Path, files: dict[str, bytes]) -> None:
    """Write each file through a temp file + rename, so a crash never leaves half a PNG."""
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, out / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _upload_files(run_id: str, files: dict[str, bytes]) -> None:
    from dtrain import storage

    for name, data in files.items():
        content_type = "application/json" if name.endswith(".json") else "image/png"
        storage.upload_bytes(data, MODELS_BUCKET, f"{run_id}/eval/{name}", content_type=content_type)


# --- text -----------------------------------------------------------------------------------
def format_report(report: dict) -> str:
    """A readable summary: accuracy, per-class table, confusion matrix, worst mistakes."""
    names = report["class_names"]
    lines = [f"run {report['run_id']} on {report['dataset']} test set: {report['n_samples']} images",
             f"accuracy {report['accuracy']:.4%} ({report['correct']}/{report['n_samples']}), "
             f"mean loss {report['loss']:.4f}"]
    if report.get("trained_accuracy") is not None:
        lines.append(f"trainer recorded {report['trained_accuracy']:.4%} "
                     f"(difference {report['accuracy_difference']:+.2e})")
    width = max(len(n) for n in names)
    labels = [f"{c} {name}" for c, name in enumerate(names)]  # the index heads the matrix columns
    label_width = max(len(label) for label in labels)
    lines += ["", f"{'class':<{label_width}}  support  correct  accuracy"]
    for label, row in zip(labels, report["per_class"], strict=True):
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        lines.append(f"{label:<{label_width}}  {row['support']:>7}  {row['correct']:>7}  {acc:>8}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class):"]
    cell = max(5, len(str(max(max(r) for r in report["confusion_matrix"]))) + 1)
    lines.append(" " * label_width + "".join(f"{c:>{cell}}" for c in range(len(names))))
    for label, row in zip(labels, report["confusion_matrix"], strict=True):
        lines.append(f"{label:<{label_width}}" + "".join(f"{v:>{cell}}" for v in row))
    lines += ["", f"most confident mistakes ({len(report['worst_mistakes'])} shown):"]
    for m in report["worst_mistakes"]:
        lines.append(f"  #{m['index']:<6} true {names[m['true']]:<{width}}  predicted "
                     f"{names[m['predicted']]:<{width}}  confidence {m['confidence']:.1%}")
    return "\n".join(lines)


def format_runs(rows: list[dict]) -> str:
    """The ``dtrain evaluate --list`` table."""
    if not rows:
        return f"no runs in s3://{MODELS_BUCKET}/ yet: run 'dtrain train' first"

    def pct(value):
        return "-" if value is None else f"{value:.2%}"

    width = max(len("run"), *(len(r["run_id"]) for r in rows))
    lines = [f"  {'run':<{width}}  {'dataset':<13}  workers  epochs  trained  evaluated"]
    for r in rows:
        lines.append(f"{'*' if r['latest'] else ' '} {r['run_id']:<{width}}  {r['dataset'] or '-':<13}  "
                     f"{r['workers'] if r['workers'] is not None else '-':>7}  "
                     f"{r['epochs'] if r['epochs'] is not None else '-':>6}  "
                     f"{pct(r['test_accuracy']):>7}  {pct(r['eval_accuracy']):>9}")
    return "\n".join(lines + ["(* = latest)"])
