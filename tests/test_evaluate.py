"""Evaluation of a trained run, against the real embedded MinIO.

A tiny CNN (the project's own architecture, narrowed) is trained for a few steps on
synthetic 10-class images, saved in the trainer's run layout, and evaluated. Every
number in the report is checked against a direct computation on the same tensors.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from dtrain import cli, datasets, evaluate, plots, storage
from dtrain import model as model_lib
from dtrain.errors import ModelNotFoundError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PNG_NAMES = ("confusion_matrix.png", "mistakes.png", "per_class_accuracy.png", "training_curves.png")
CLASS_NAMES = [f"class-{c}" for c in range(10)]
TINY = {"conv1_channels": 4, "conv2_channels": 8, "hidden": 32}
RUN_A, RUN_B = "20260101-000000-aaaa", "20260102-000000-bbbb"


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained 20 steps on noisy class templates, and a test set it gets
    roughly 85 % right."""
    generator = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 1, 28, 28, generator=generator)

    def sample(count):
        labels = torch.randint(0, 10, (count,), generator=generator)
        return templates[labels] + 1.0 * torch.randn(count, 1, 28, 28, generator=generator), labels

    train_x, train_y = sample(1024)
    test_x, test_y = sample(600)
    # Relabel 15 % of the test set at random: however well the network learns the easy
    # templates, it then makes dozens of (confident) mistakes for the report to rank.
    flipped = torch.rand(len(test_y), generator=generator) < 0.15
    test_y[flipped] = (test_y[flipped] + torch.randint(1, 10, (int(flipped.sum()),), generator=generator)) % 10
    torch.manual_seed(0)
    net = model_lib.build_model(TINY)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(20):
        batch = torch.randint(0, len(train_x), (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    scored = model_lib.evaluate(net, test_x, test_y)  # what the trainer writes to metrics.json
    assert 0.6 < scored["accuracy"] < 0.95, scored
    return {"model": net.eval(), "images": test_x, "labels": test_y, "trainer": scored}


def _save_run(run_id: str, trained: dict, model_config: dict | None = None,
              dataset: str = "synthetic") -> None:
    """Write a run exactly as the trainer lays it out in s3://models/<run-id>/."""
    bucket = evaluate.MODELS_BUCKET
    buffer = io.BytesIO()
    torch.save(trained["model"].state_dict(), buffer)
    cfg = {**model_lib.architecture(model_config or TINY), "dataset": dataset, "workers": 2, "epochs": 2}
    acc = trained["trainer"]["accuracy"]
    metrics = {"history": [{"epoch": 1, "train_loss": 1.9, "test_loss": 1.2, "test_accuracy": acc - 0.2,
                            "samples_per_s": 900.0, "epoch_time_s": 1.5},
                           {"epoch": 2, "train_loss": 1.1, "test_loss": trained["trainer"]["loss"],
                            "test_accuracy": acc, "samples_per_s": 950.0, "epoch_time_s": 1.4}],
               "final": {"test_accuracy": acc}}
    storage.upload_bytes(buffer.getvalue(), bucket, f"{run_id}/model.pt")
    storage.upload_bytes(json.dumps(cfg).encode(), bucket, f"{run_id}/config.json")
    storage.upload_bytes(json.dumps(metrics).encode(), bucket, f"{run_id}/metrics.json")


def _set_latest(run_id: str) -> None:
    storage.upload_bytes(json.dumps({"run_id": run_id}).encode(), evaluate.MODELS_BUCKET, "latest.json")


@pytest.fixture
def models(bucket, monkeypatch, trained, tmp_path):
    """Two runs (B is latest) in a bucket of this test's own, and the synthetic test set
    in place of the dataset's. DTRAIN_HOME is this test's, so default paths are too."""
    monkeypatch.setattr(evaluate, "MODELS_BUCKET", bucket)
    monkeypatch.setenv("DTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(evaluate, "load_test_set",
                        lambda name: (trained["images"], trained["labels"], CLASS_NAMES))
    _save_run(RUN_A, trained)
    _save_run(RUN_B, trained)
    _set_latest(RUN_B)
    return bucket


def _is_png(data: bytes) -> bool:
    return data.startswith(PNG_MAGIC) and len(data) > 5_000


# --- pure scoring -------------------------------------------------------------------------
def test_score_counts_a_hand_made_case():
    # 3 classes, 5 samples: two errors, the confident one (index 3, 0.9) ranked first.
    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1],
                              [0.05, 0.05, 0.9], [0.1, 0.1, 0.8]])
    report = evaluate.score(np.log(probabilities), np.array([0, 1, 1, 0, 2]), ["a", "b", "c"])
    assert report["correct"] == 3 and report["accuracy"] == pytest.approx(0.6)
    assert report["confusion_matrix"] == [[1, 0, 1], [1, 1, 0], [0, 0, 1]]
    assert [row["accuracy"] for row in report["per_class"]] == [0.5, 0.5, 1.0]
    assert [row["support"] for row in report["per_class"]] == [2, 2, 1]
    assert [(m["index"], m["true"], m["predicted"]) for m in report["worst_mistakes"]] == [(3, 0, 2), (2, 1, 0)]
    assert report["worst_mistakes"][0]["confidence"] == pytest.approx(0.9)
    expected_loss = -np.mean(np.log([0.8, 0.7, 0.3, 0.05, 0.8]))
    assert report["loss"] == pytest.approx(expected_loss)


def test_score_class_without_samples_has_no_accuracy():
    report = evaluate.score(np.log(np.array([[0.9, 0.1], [0.9, 0.1]])), np.array([0, 0]), ["a", "b"])
    assert report["per_class"][1] == {"class": 1, "name": "b", "support": 0, "correct": 0, "accuracy": None}
    assert report["worst_mistakes"] == []


def test_plots_render_pngs():
    history = [{"epoch": 1, "train_loss": 1.0, "test_loss": 0.9, "test_accuracy": 0.7},
               {"epoch": 2, "train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.8}]
    mistakes = [{"index": 4, "true": 0, "predicted": 1, "confidence": 0.93}]
    figures = [plots.confusion_matrix_figure(np.array([[5, 1], [2, 7]]), ["a", "b"]),
               plots.mistakes_figure(np.zeros((1, 1, 28, 28)), mistakes, ["a", "b"]),
               plots.mistakes_figure(np.zeros((0, 28, 28)), [], ["a", "b"]),
               plots.per_class_accuracy_figure([0.83, 0.78], ["a", "b"], overall=0.8),
               plots.training_curves_figure(history)]
    for fig in figures:
        title = fig.get_suptitle() or fig.axes[0].get_title()
        assert title and _is_png(plots.png_bytes(fig))
    assert figures[0].axes[0].get_xlabel() == "predicted class"
    assert [ax.get_title() for ax in figures[4].axes] == ["Loss", "Test accuracy"]


# --- against MinIO ------------------------------------------------------------------------
def test_evaluate_latest_matches_a_direct_computation(models, trained, tmp_path):
    out = tmp_path / "eval"
    report = evaluate.evaluate("latest", out_dir=out)
    images, labels = trained["images"], trained["labels"]
    with torch.no_grad():
        logits = trained["model"](images)
    predicted = logits.argmax(1)
    n = len(labels)

    assert report["run_id"] == RUN_B and report["n_samples"] == n
    assert report["correct"] == int((predicted == labels).sum())
    assert report["accuracy"] == report["correct"] / n
    assert abs(report["accuracy"] - trained["trainer"]["accuracy"]) <= 1e-6
    assert abs(report["accuracy_difference"]) <= 1e-6
    assert report["loss"] == pytest.approx(trained["trainer"]["loss"], rel=1e-4)

    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == n
    assert np.trace(matrix) / n == pytest.approx(report["accuracy"], abs=1e-12)
    for c, row in enumerate(report["per_class"]):
        mask = labels == c
        assert row["support"] == int(mask.sum()) == matrix[c].sum()
        assert row["accuracy"] == int((predicted[mask] == c).sum()) / int(mask.sum())

    mistakes = report["worst_mistakes"]
    wrong = int((predicted != labels).sum())
    assert len(mistakes) == min(evaluate.WORST_MISTAKES, wrong) > 0
    confidences = torch.softmax(logits, 1).max(1).values
    assert all(labels[m["index"]] == m["true"] != m["predicted"] == predicted[m["index"]] for m in mistakes)
    assert [m["confidence"] for m in mistakes] == sorted((m["confidence"] for m in mistakes), reverse=True)
    top_wrong = confidences[predicted != labels].max().item()
    assert mistakes[0]["confidence"] == pytest.approx(top_wrong, rel=1e-5)

    saved = json.loads((out / "report.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and saved["confusion_matrix"] == report["confusion_matrix"]
    for name in PNG_NAMES:
        local = (out / name).read_bytes()
        assert _is_png(local), name
        assert storage.get_bytes(models, f"{RUN_B}/eval/{name}") == local
    assert json.loads(storage.get_bytes(models, f"{RUN_B}/eval/report.json")) == saved
    assert not list(out.glob(".*")), "temporary files left behind"


def test_evaluate_named_run_without_upload_writes_under_dtrain_home(models, tmp_path):
    report = evaluate.evaluate(RUN_A, upload=False)
    out = tmp_path / "home" / "runs" / RUN_A / "eval"
    assert report["run_id"] == RUN_A and report["local_dir"] == str(out) and report["s3_prefix"] is None
    assert sorted(p.name for p in out.iterdir()) == sorted([*PNG_NAMES, "report.json"])
    assert storage.list_objects(models, f"{RUN_A}/eval/") == []


def test_resolve_run_and_unknown_ids(models):
    assert evaluate.resolve_run() == RUN_B
    assert evaluate.resolve_run(RUN_A) == RUN_A
    assert evaluate.known_runs() == [RUN_A, RUN_B]
    for bad in ("nope", "../x", ""):
        with pytest.raises(ModelNotFoundError) as err:
            evaluate.resolve_run(bad)
        assert str(err.value) == (f"no model for run '{bad}' in s3://{models}/: known runs: "
                                  f"{RUN_A}, {RUN_B} (latest: {RUN_B})")
    storage.delete(models, "latest.json")
    with pytest.raises(ModelNotFoundError, match=r"no model for run 'latest'.*\(latest: none\)"):
        evaluate.resolve_run("latest")


def test_resolve_run_in_an_empty_store(s3, monkeypatch):
    monkeypatch.setattr(evaluate, "MODELS_BUCKET", "no-such-models-bucket")
    assert evaluate.known_runs() == [] and evaluate.list_runs() == []
    with pytest.raises(ModelNotFoundError, match="known runs: none yet"):
        evaluate.resolve_run()


def test_broken_runs_raise_one_line_errors(models, trained):
    _save_run(RUN_A, trained, model_config={**TINY, "hidden": 16})
    with pytest.raises(ModelNotFoundError, match=f"model.pt of run '{RUN_A}' does not fit its config.json"):
        evaluate.load_model(RUN_A)
    _save_run(RUN_A, trained, model_config={**TINY, "arch": "transformer"})
    with pytest.raises(ModelNotFoundError, match=f"config.json of run '{RUN_A}' does not describe a known"):
        evaluate.load_model(RUN_A)
    storage.upload_bytes(b"not a state dict", models, f"{RUN_A}/model.pt")
    with pytest.raises(ModelNotFoundError, match=f"model.pt of run '{RUN_A}' is not a torch state_dict"):
        evaluate.load_model(RUN_A)
    storage.upload_bytes(b"{broken", models, f"{RUN_A}/config.json")
    with pytest.raises(ModelNotFoundError, match=f"s3://{models}/{RUN_A}/config.json is not valid JSON"):
        evaluate.load_model(RUN_A)


def test_cli_evaluate_prints_summary_and_paths(models, trained, tmp_path, capsys):
    assert cli.main(["evaluate", "--out", str(tmp_path / "cli")]) == 0
    text = capsys.readouterr().out
    accuracy = trained["trainer"]["accuracy"]
    assert f"run {RUN_B} on synthetic test set: 600 images" in text
    assert f"accuracy {accuracy:.4%}" in text and "difference +0.00e+00" in text
    assert "class-9" in text and "confusion matrix" in text and "most confident mistakes (16 shown)" in text
    assert f"files written to {tmp_path / 'cli'}" in text and f"uploaded to s3://{models}/{RUN_B}/eval/" in text


def test_cli_list_shows_runs_with_accuracy(models, trained, capsys):
    evaluate.evaluate(RUN_A, upload=True)
    assert cli.main(["evaluate", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    accuracy = f"{trained['trainer']['accuracy']:.2%}"
    row_a = next(line for line in lines if RUN_A in line)
    row_b = next(line for line in lines if RUN_B in line)
    assert row_b.startswith("*") and not row_a.startswith("*")
    assert row_a.split()[-2:] == [accuracy, accuracy]  # trained and evaluated
    assert row_b.split()[-2:] == [accuracy, "-"]  # not evaluated yet
    assert cli.main(["evaluate", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run_id"], r["latest"], r["dataset"], r["workers"]) for r in rows] == [
        (RUN_A, False, "synthetic", 2), (RUN_B, True, "synthetic", 2)]


def test_cli_unknown_run_is_one_line_and_exit_2(models, capsys):
    assert cli.main(["evaluate", "--run", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"dtrain: error: no model for run 'nope' in s3://{models}/: known runs: "
                            f"{RUN_A}, {RUN_B} (latest: {RUN_B})\n")


@pytest.mark.slow
def test_evaluate_on_fashion_mnist_from_s3(bucket, monkeypatch, tmp_path):
    """The whole path with the real test split: published to MinIO, read back by
    evaluate through datasets.load, scored on all 10,000 images."""
    datasets.prepare("fashion-mnist")
    train_x, train_y = datasets.load("fashion-mnist", "train")
    torch.manual_seed(0)
    net = model_lib.build_model(TINY)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for step in range(30):
        batch = slice(step * 128, (step + 1) * 128)
        loss = torch.nn.functional.cross_entropy(net(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test_x, test_y = datasets.load("fashion-mnist", "test")
    scored = model_lib.evaluate(net, test_x, test_y)
    monkeypatch.setattr(evaluate, "MODELS_BUCKET", bucket)
    _save_run(RUN_A, {"model": net.eval(), "trainer": scored}, dataset="fashion-mnist")
    _set_latest(RUN_A)

    report = evaluate.evaluate(out_dir=tmp_path)
    assert report["n_samples"] == 10_000 and report["class_names"][9] == "Ankle boot"
    assert report["correct"] == round(scored["accuracy"] * 10_000)
    assert report["accuracy"] > 0.5 and abs(report["accuracy_difference"]) <= 1e-6
    assert [row["support"] for row in report["per_class"]] == [1000] * 10
    assert "Ankle boot" in evaluate.format_report(report)
