"""The model, the training loop without Ray, the driver's checks and publishing, the
submitter's log parsing and the ``train`` CLI. No Ray cluster here (see test_train_ray.py);
the publishing tests use the real embedded MinIO."""

from __future__ import annotations

import argparse
import io
import json
import os

import pytest
import torch

from dtrain import cli, datasets, driver, evaluate, storage, submit, train
from dtrain import model as model_lib
from dtrain.errors import DatasetError, TrainingError


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """No test here may read or write the user's .dtrain/."""
    if "DTRAIN_HOME" not in os.environ:
        monkeypatch.setenv("DTRAIN_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def small_data():
    """2048 training and 1000 test images of Fashion-MNIST, read from the local source."""
    train_x, train_y = datasets.load_local("fashion-mnist", "train")
    test_x, test_y = datasets.load_local("fashion-mnist", "test")
    return {"train": (train_x[:2048], train_y[:2048]), "test": (test_x[:1000], test_y[:1000])}


# --- model -----------------------------------------------------------------------------------
def test_model_shapes_size_and_rebuild_from_config():
    net = model_lib.build_model()
    params = sum(p.numel() for p in net.parameters())
    assert 350_000 < params < 500_000  # fc 1568→256 dominates: small enough for 2 cores
    logits = net.eval()(torch.zeros(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    saved = json.loads(json.dumps(model_lib.architecture({"hidden": 64, "lr": 1.0})))
    assert saved == {**{k: model_lib.DEFAULT_CONFIG[k] for k in model_lib.MODEL_KEYS}, "hidden": 64}
    rebuilt = model_lib.build_model(saved)
    rebuilt.load_state_dict(model_lib.build_model({"hidden": 64}).state_dict())  # same shapes
    with pytest.raises(ValueError, match="unknown model arch"):
        model_lib.build_model({"arch": "resnet"})


def test_predict_returns_probabilities_in_batches():
    torch.manual_seed(0)
    net, images = model_lib.build_model(), torch.randn(10, 1, 28, 28)
    probs = model_lib.predict(net, images, batch_size=3)
    assert probs.shape == (10, 10)
    assert torch.allclose(probs.sum(1), torch.ones(10), atol=1e-5)
    assert torch.equal(probs.argmax(1), net.eval()(images).argmax(1))
    assert model_lib.predict(net, images[:0]).shape == (0, 10)


def test_one_cycle_schedule_warms_up_then_decays():
    net = model_lib.build_model()
    optimizer = model_lib.make_optimizer(net, {"lr": 0.01})
    scheduler = model_lib.make_scheduler(optimizer, {"lr": 0.01}, steps_per_epoch=10, epochs=2)
    rates = []
    for _ in range(20):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.001)
    assert max(rates) == pytest.approx(0.01, rel=0.05) and rates.index(max(rates)) == 4  # 25 % of 20 steps, 0-based
    assert rates[-1] < 0.0005
    assert [g["weight_decay"] for g in optimizer.param_groups] == [model_lib.DEFAULT_CONFIG["weight_decay"], 0.0]


# --- sharding and the loop -------------------------------------------------------------------
def test_shards_are_disjoint_equal_and_reshuffled_each_epoch():
    shards = [train.shard_order(1003, rank, 4, seed=7, epoch=0) for rank in range(4)]
    assert {len(s) for s in shards} == {250}  # the 3-sample tail is dropped on every rank
    joined = torch.cat(shards)
    assert len(set(joined.tolist())) == 1000
    assert torch.equal(shards[1], train.shard_order(1003, 1, 4, seed=7, epoch=0))
    assert not torch.equal(shards[1], train.shard_order(1003, 1, 4, seed=7, epoch=1))


def test_run_local_learns(small_data):
    torch.manual_seed(model_lib.DEFAULT_CONFIG["seed"])
    untrained = model_lib.evaluate(model_lib.build_model(), *small_data["test"])
    history = train.run_local({"epochs": 1, "batch_size": 64, "cpus_per_worker": 2}, data=small_data)
    assert len(history) == 1
    row = history[0]
    assert row["epoch"] == 1 and row["world_size"] == 1 and row["resumed_from_epoch"] == 0
    assert row["test_count"] == 1000
    assert row["test_loss"] < untrained["loss"] - 1.0, (untrained, row)
    assert row["test_accuracy"] > 0.65
    assert row["samples_per_s"] > 0 and row["epoch_time_s"] >= row["train_time_s"] > 0
    # The returned metrics are those of the model left behind.
    assert model_lib.evaluate(train.run_local.last_model, *small_data["test"])["accuracy"] == row["test_accuracy"]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"workers": 0}, "workers must be a whole number ≥ 1"),
    ({"epochs": 1.5}, "epochs must be a whole number"),
    ({"batch_size": 4, "workers": 8}, "batch-size 4 is smaller than workers 8"),
    ({"lr": -1.0}, "lr must be > 0"),
    ({"fail_at_epoch": 1, "epochs": 2}, "fail_at_epoch must be between 2 and epochs"),
])
def test_run_config_rejects_bad_values(overrides, message):
    with pytest.raises(TrainingError, match=message):
        train.run_config(overrides)


def test_run_config_rejects_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        train.run_config({"dataset": "cifar"})


def test_driver_command_parses_back_to_the_same_run():
    cmd = train.driver_command("mnist", 8, 3, "mnist-20260101-000000-abcd", cpus_per_worker=2,
                               batch_size=512, lr=0.002)
    assert cmd[:5] == ["python", "-m", "dtrain", "train", "--driver"]
    args = cli.build_parser().parse_args(cmd[3:])
    assert (args.dataset, args.workers, args.epochs, args.run_id) == ("mnist", 8, 3, "mnist-20260101-000000-abcd")
    assert (args.cpus_per_worker, args.batch_size, args.lr, args.driver) == (2, 512, 0.002, True)
    assert "--lr" not in train.driver_command("mnist", 2, 1, "r")


def test_extra_config_travels_in_the_command_and_is_checked():
    cmd = train.driver_command("mnist", 2, 1, "r", extra={"train_samples": 100, "fail_at_epoch": 2})
    args = cli.build_parser().parse_args(cmd[3:])
    assert train.check_extra(args.extra_config) == {"fail_at_epoch": 2, "train_samples": 100}
    with pytest.raises(TrainingError, match="unknown run setting.* nope"):
        train.driver_command("mnist", 2, 1, "r", extra={"nope": 1})
    with pytest.raises(TrainingError, match="not valid JSON"):
        train.check_extra("{bad")


@pytest.mark.parametrize("run_id", ["", "Upper-Case", "-leading-dash", "a/b", "x" * 64])
def test_bad_run_ids_are_refused(run_id):
    with pytest.raises(TrainingError, match="bad run id"):
        driver.check_run_id(run_id)


def test_run_ids_are_unique_and_valid():
    ids = {submit.make_run_id("fashion-mnist") for _ in range(20)}
    assert len(ids) == 20
    assert all(driver.check_run_id(i).startswith("fashion-mnist-20") for i in ids)


# --- CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--workers", "0"], ["--epochs", "two"], ["--driver", "--local"]])
def test_cli_rejects_bad_arguments_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("dtrain train: error:") and err.count("\n") == 1


def test_cli_unknown_dataset_exits_2_before_anything_starts(capsys):
    assert cli.main(["train", "--dataset", "cifar", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "dtrain: error: unknown dataset 'cifar': choose one of auto, mnist, fashion-mnist\n"


def test_cli_local_prints_the_final_metrics(small_data, monkeypatch, capsys):
    monkeypatch.setattr(train, "load_data", lambda cfg: small_data)
    assert cli.main(["train", "--local", "--epochs", "1", "--batch-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "DTRAIN_EPOCH" in out and "run local: test accuracy 0." in out and "after 1 epochs" in out


# --- the submitter's log parsing ------------------------------------------------------------
def test_log_follower_parses_markers_from_worker_prefixed_lines():
    lines = []
    follower = submit.LogFollower(epochs=2, submitted_at=0.0, echo=lines.append, progress=False)
    epoch = {"epoch": 1, "test_accuracy": 0.88, "train_loss": 0.6}
    result = {"run_id": "r", "history": [{**epoch}], "final": epoch}
    follower.feed(f"(RayTrainWorker pid=12) DTRAIN_FIRST_STEP {json.dumps({'time': 1.0})}\n"
                  f"\x1b[36m(RayTrainWorker pid=12)\x1b[0m DTRAIN_EPOCH {json.dumps(epoch)}\n"
                  f"DTRAIN_RESULT {json.dumps(result)}\n")
    follower.close()
    assert len(lines) == 3 and follower.first_step_at is not None
    assert [row["epoch"] for row in follower.epochs] == [1] and follower.epochs[0]["since_submit_s"] > 0
    assert follower.result == result
    timed = submit._with_timings(follower, began=follower.first_step_at - 5, submitted=follower.first_step_at - 4,
                                 job_id="j")
    assert timed["timings"]["submit_to_first_step_s"] == pytest.approx(5, abs=0.01)
    assert timed["timings"]["submit_s"] == pytest.approx(1, abs=0.01)
    assert timed["history"][0]["since_submit_s"] == follower.epochs[0]["since_submit_s"]


def test_log_follower_picks_our_error_line_over_ray_noise():
    follower = submit.LogFollower(epochs=1, submitted_at=0.0, echo=lambda line: None, progress=False)
    follower.feed("Traceback (most recent call last):\nValueError: deep inside\n"
                  "dtrain: error: asked for 8 workers × 1 CPU but the cluster has 4 CPUs\n"
                  "(TrainController) RuntimeError: later noise\n")
    assert follower.error_line() == "asked for 8 workers × 1 CPU but the cluster has 4 CPUs"
    follower.tail = ["x", "ray.exceptions.RayTaskError: boom"]
    assert follower.error_line() == "RayTaskError: boom"


# --- driver checks and publishing (real MinIO) -----------------------------------------------
def test_missing_dataset_in_bucket_is_a_clear_error(bucket):
    with pytest.raises(DatasetError, match="dataset 'mnist' not found in s3://.*dtrain data prepare"):
        driver.check_inputs(train.run_config({"dataset": "mnist"}), "mnist-run", datasets_bucket=bucket)


def test_published_run_is_what_evaluate_loads(bucket):
    run_id = submit.make_run_id("fashion-mnist")
    torch.manual_seed(3)
    net = model_lib.build_model()
    cfg = train.run_config({"workers": 2, "epochs": 1})
    metadata = driver.run_metadata(cfg, run_id)
    history = [{"epoch": 1, "test_accuracy": 0.5, "test_loss": 1.0, "train_loss": 1.1}]
    metrics = {"run_id": run_id, "history": history, "final": history[-1], "checkpoint": "s3://x"}
    uri = driver.publish_model(run_id, net.state_dict(), metadata, metrics)
    assert uri == f"s3://models/{run_id}/"
    assert evaluate.latest_run() == run_id
    loaded, loaded_cfg = evaluate.load_model(run_id)
    images = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded(images), net.eval()(images))
    assert loaded_cfg["dataset"] == "fashion-mnist" and loaded_cfg["workers"] == 2
    assert loaded_cfg["normalization"] == {"mean": 0.2860, "std": 0.3530}
    assert loaded_cfg["ray_version"] == "2.60.0"
    assert json.loads(storage.get_bytes("models", f"{run_id}/metrics.json"))["final"]["test_accuracy"] == 0.5
    state = torch.load(io.BytesIO(storage.get_bytes("models", f"{run_id}/model.pt")), weights_only=True)
    assert set(state) == set(net.state_dict())
    # The same run id cannot be trained twice (it would mix two runs' files).
    storage.upload_bytes(b'{"dataset": "fashion-mnist"}', bucket, "fashion-mnist/manifest.json")
    driver.check_inputs(cfg, "a-new-run", datasets_bucket=bucket)
    with pytest.raises(TrainingError, match=f"run id '{run_id}' already has a model"):
        driver.check_inputs(cfg, run_id, datasets_bucket=bucket)


def test_latest_pointer_moves_only_after_the_run_is_complete(s3, monkeypatch):
    """If an upload fails half-way, latest.json still names the previous complete run."""
    before = driver.publish_model("complete-run", model_lib.build_model().state_dict(),
                                  driver.run_metadata(train.run_config({}), "complete-run"), {"final": {}})
    assert before and evaluate.latest_run() == "complete-run"
    real_upload = storage.upload_bytes

    def flaky(data, bucket, key, content_type=None):
        if key.endswith("metrics.json"):
            raise TrainingError("simulated S3 failure")
        return real_upload(data, bucket, key, content_type)

    monkeypatch.setattr(storage, "upload_bytes", flaky)
    with pytest.raises(TrainingError, match="simulated"):
        driver.publish_model("broken-run", model_lib.build_model().state_dict(),
                             driver.run_metadata(train.run_config({}), "broken-run"), {"final": {}})
    assert evaluate.latest_run() == "complete-run"


def test_driver_main_rejects_bad_run_id_before_connecting(monkeypatch):
    monkeypatch.setattr(driver, "connect_ray", lambda: pytest.fail("must not connect"))
    args = argparse.Namespace(dataset="mnist", workers=2, epochs=1, cpus_per_worker=1, batch_size=256,
                              lr=None, run_id="Bad/Id")
    with pytest.raises(TrainingError, match="bad run id"):
        driver.driver_main(args)


# --- the submitter against a stand-in Jobs API ----------------------------------------------
class FakeJobs:
    """Just enough of JobSubmissionClient: a scripted log stream and final status."""

    def __init__(self, chunks, status="SUCCEEDED", interrupt=False):
        self.chunks, self.status, self.interrupt = chunks, status, interrupt
        self.submitted, self.stopped = [], []

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]

    async def tail_job_logs(self, job_id):
        for chunk in self.chunks:
            yield chunk
        if self.interrupt:
            raise KeyboardInterrupt

    def get_job_status(self, job_id):
        return self.status

    def get_job_info(self, job_id):
        return argparse.Namespace(message="Job entrypoint command failed with exit code 2")

    def stop_job(self, job_id):
        self.stopped.append(job_id)


@pytest.fixture
def fake_jobs(monkeypatch):
    from dtrain import cluster

    def install(client):
        monkeypatch.setattr(cluster, "resolve_address", lambda address=None: "http://127.0.0.1:1")
        monkeypatch.setattr(cluster, "job_client", lambda address=None: client)
        monkeypatch.setattr(submit, "runtime_env", lambda extra=None, **_: {"env_vars": {}})
        return client
    return install


def test_submit_returns_the_driver_result_with_timings(fake_jobs):
    epoch = {"epoch": 1, "test_accuracy": 0.9, "train_loss": 0.5}
    result = {"run_id": "r", "history": [epoch], "final": epoch, "timings": {"fit_s": 3.0}}
    client = fake_jobs(FakeJobs([f"(RayTrainWorker pid=1) DTRAIN_FIRST_STEP {json.dumps({'time': 0})}\n",
                                 f"(RayTrainWorker pid=1) DTRAIN_EPOCH {json.dumps(epoch)}\n",
                                 f"DTRAIN_RESULT {json.dumps(result)}\n"]))
    out = submit.submit("mnist", workers=2, epochs=1, run_id="mnist-run-1", echo=lambda line: None,
                        progress=False, extra={"train_samples": 512})
    job = client.submitted[0]
    assert job["submission_id"] == "dtrain-mnist-run-1" and job["entrypoint_num_cpus"] == 0
    assert job["entrypoint"].startswith("python -m dtrain train --driver --dataset mnist --workers 2 --epochs 1")
    assert "--extra-config" in job["entrypoint"]
    assert out["job_id"] == "dtrain-mnist-run-1" and out["timings"]["fit_s"] == 3.0
    assert out["timings"]["submit_to_first_step_s"] >= 0 and out["history"][0]["since_submit_s"] >= 0


def test_failed_job_raises_its_error_line(fake_jobs):
    fake_jobs(FakeJobs(["Traceback (most recent call last):\n",
                        "dtrain: error: dataset 'mnist' not found in s3://datasets/mnist/\n"], status="FAILED"))
    with pytest.raises(TrainingError, match=r"^job dtrain-mnist-x failed: dataset 'mnist' not found in s3://datasets/mnist/$"):
        submit.submit("mnist", 2, 1, run_id="mnist-x", echo=lambda line: None, progress=False)


def test_ctrl_c_stops_the_job(fake_jobs):
    client = fake_jobs(FakeJobs(["starting\n"], status="RUNNING", interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        submit.submit("mnist", 2, 1, run_id="mnist-y", echo=lambda line: None, progress=False)
    assert client.stopped == ["dtrain-mnist-y"]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 8, 15, 16, 17, 40])
def test_scheduler_survives_any_run_length(steps):
    """OneCycleLR alone raises ZeroDivisionError on 4 steps; tiny runs must still train."""
    from dtrain import model as model_lib

    net = model_lib.build_model({})
    optimizer = model_lib.make_optimizer(net, {})
    scheduler = model_lib.make_scheduler(optimizer, {}, steps_per_epoch=steps, epochs=1)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] > 0
