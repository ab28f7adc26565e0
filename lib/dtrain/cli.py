"""The ``dtrain`` command line. Every notebook step has a command here.

Handlers import their module lazily so ``dtrain --help`` answers in well under a
second (importing Ray or torch takes several). Any :class:`DtrainError` becomes one
line on stderr and exit code 2; so does a bad argument.
"""

from __future__ import annotations

import argparse
import json
import sys

from dtrain.errors import DtrainError
from dtrain.versions import PACKAGE_VERSION


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dtrain: error: …``) and exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


# --- dtrain s3 -----------------------------------------------------------------------------
def _s3(sub) -> None:
    p = sub.add_parser("s3", help="the embedded MinIO server", description="Run the embedded MinIO server "
                       "on 127.0.0.1 with generated credentials (state in .dtrain/s3.json).")
    s = p.add_subparsers(dest="action", required=True, metavar="{up,down,status,env}")
    up = s.add_parser("up", help="build-if-needed and start MinIO; prints the endpoint")
    up.add_argument("--port", type=int, default=0, help="port to bind on 127.0.0.1 (default: a free one)")
    up.add_argument("--tls", action="store_true", help="serve HTTPS with a generated self-signed CA")
    up.add_argument("--backend", choices=["auto", "minio", "moto"], default="auto",
                    help="auto: MinIO when its binary exists, else moto's S3 server (with a warning)")
    s.add_parser("down", help="stop the server (data is kept)")
    s.add_parser("status", help="endpoint, pid, backend, health")
    s.add_parser("env", help="print export lines: eval \"$(dtrain s3 env)\"")


def _run_s3(args) -> int:
    from dtrain import s3server

    if args.action == "up":
        info = s3server.up(port=args.port, tls=args.tls, backend=args.backend)
        print(f"S3 ({info['backend']}) ready at {info['endpoint_url']}  pid {info['pid']}")
    elif args.action == "down":
        print(s3server.down())
    elif args.action == "status":
        _print_json(s3server.status())
    else:
        print(s3server.env_exports())
    return 0


# --- dtrain evaluate -----------------------------------------------------------------------
def _evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score a trained run on its test set; figures and report",
                       description="Load a run's model from s3://models/<run-id>/, score its dataset's "
                       "test split, print a summary, and write report.json plus PNG figures locally and "
                       "to s3://models/<run-id>/eval/.")
    p.add_argument("--run", default="latest", help="run id, or 'latest' (default)")
    p.add_argument("--out", metavar="DIR", help="local folder (default: .dtrain/runs/<run-id>/eval/)")
    p.add_argument("--no-upload", action="store_true", help="keep the files local only")
    p.add_argument("--list", action="store_true", help="list the runs in s3://models/ with their accuracy")
    p.add_argument("--json", action="store_true", help="print the report (or the run list) as JSON")


def _run_evaluate(args) -> int:
    from dtrain import evaluate

    if args.list:
        rows = evaluate.list_runs()
        if args.json:
            _print_json(rows)
        else:
            print(evaluate.format_runs(rows))
        return 0
    report = evaluate.evaluate(args.run, out_dir=args.out, upload=not args.no_upload)
    if args.json:
        _print_json(report)
        return 0
    print(evaluate.format_report(report))
    print(f"\nfiles written to {report['local_dir']}")
    if report["s3_prefix"]:
        print(f"uploaded to {report['s3_prefix']}")
    return 0


# --- dtrain bucket ---------------------------------------------------------------------------
def _bucket(sub) -> None:
    p = sub.add_parser("bucket", help="S3 objects: upload, download, list, delete…",
                       description="Work with objects in the S3 store (the original buckethandler.py, "
                       "without hard-coded keys: settings come from AWS_* or 'dtrain s3 up').")
    s = p.add_subparsers(dest="action", required=True,
                         metavar="{upload,download,get,delete,get-info,get-size,clean,list}")
    def verb(name, help_, key=True, key_required=True):
        v = s.add_parser(name, help=help_)
        v.add_argument("--bucket", required=True, help="bucket name, e.g. datasets or models")
        if key:
            v.add_argument("--key", required=key_required, help="object key inside the bucket")
        return v
    up = verb("upload", "upload a local file (skipped when the same bytes are there)", key_required=False)
    up.add_argument("--file", required=True, help="local file to upload (key defaults to its name)")
    down = verb("download", "download an object to a file, verified by sha256")
    down.add_argument("--out", default=".", help="file or folder to write (default: current folder)")
    verb("get", "print an object's content to stdout")
    verb("delete", "delete one object")
    verb("get-info", "size, sha256, ETag and date of one object")
    verb("get-size", "total bytes in a bucket (or under --prefix)", key=False).add_argument("--prefix", default="")
    verb("clean", "delete every object under --prefix", key=False).add_argument("--prefix", default="")
    verb("list", "list objects under --prefix", key=False).add_argument("--prefix", default="")


def _run_bucket(args) -> int:
    from dtrain import storage

    b = args.bucket
    if args.action == "upload":
        r = storage.upload_file(args.file, b, args.key, progress=True)
        print(f"{'uploaded' if r['uploaded'] else 'unchanged, skipped'} s3://{b}/{r['key']} ({r['size']} bytes)")
    elif args.action == "download":
        r = storage.download_file(b, args.key, args.out, progress=True)
        print(f"s3://{b}/{args.key} -> {r['path']} ({r['size']} bytes, sha256 verified)")
    elif args.action == "get":
        sys.stdout.buffer.write(storage.get_bytes(b, args.key))
    elif args.action == "delete":
        storage.delete(b, args.key)
        print(f"deleted s3://{b}/{args.key}")
    elif args.action == "get-info":
        _print_json(storage.object_info(b, args.key))
    elif args.action == "get-size":
        objects = storage.list_objects(b, args.prefix)
        print(f"s3://{b}/{args.prefix}: {len(objects)} objects, {sum(o['size'] for o in objects)} bytes")
    elif args.action == "clean":
        print(f"deleted {storage.clean(b, args.prefix)} objects from s3://{b}/{args.prefix}")
    else:
        for o in storage.list_objects(b, args.prefix):
            print(f"{o['size']:>12}  {o['last_modified'][:19]}  {o['key']}")
    return 0


# --- dtrain data ---------------------------------------------------------------------------
def _data(sub) -> None:
    p = sub.add_parser("data", help="MNIST / Fashion-MNIST: fetch, publish to S3, inspect",
                       description="Find a dataset (local cache, Debian's dataset-fashion-mnist, download "
                       "mirrors), verify its checksums and publish it to s3://<bucket>/<name>/ with a "
                       "manifest.json.")
    s = p.add_subparsers(dest="action", required=True, metavar="{prepare,fetch,info}")
    for action, help_ in (("prepare", "fetch, validate and upload the dataset (idempotent)"),
                          ("fetch", "only fetch and verify into the local cache; print the paths"),
                          ("info", "which source would be used and what the bucket holds")):
        a = s.add_parser(action, help=help_)
        a.add_argument("--dataset", default="auto", choices=["auto", "mnist", "fashion-mnist"],
                       help="auto (default): MNIST if cached or downloadable, else Fashion-MNIST")
        if action != "fetch":
            a.add_argument("--bucket", default="datasets", help="S3 bucket (default: datasets)")
        a.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_data(args) -> int:
    from dtrain import datasets

    if args.action == "prepare":
        manifest = datasets.prepare(args.dataset, bucket=args.bucket)
        if args.json:
            _print_json(manifest)
        else:
            print(datasets.format_transfer(manifest, args.bucket))
    elif args.action == "fetch":
        paths = datasets.fetch(datasets.resolve_name(args.dataset))
        if args.json:
            _print_json(paths)
        else:
            print("\n".join(f"{split:<5} {kind:<6} {path}" for split, pair in paths.items()
                            for kind, path in pair.items()))
    else:
        names = datasets.DATASETS if args.dataset == "auto" else (args.dataset,)
        reports = [datasets.describe(name, args.bucket) for name in names]
        if args.json:
            _print_json(reports)
            return 0
        if args.dataset == "auto":
            try:
                print("auto -> {} ({})\n".format(*datasets.choose_auto()))
            except DtrainError as exc:
                print(f"auto -> nothing: {exc}\n")
        print("\n\n".join(datasets.format_description(r) for r in reports))
    return 0


# --- dtrain k8s -----------------------------------------------------------------------------
def _k8s(sub) -> None:
    p = sub.add_parser("k8s", help="Kubernetes manifests: render, validate, apply, status, logs…",
                       description="Render and validate the RayCluster/RayJob manifests offline (KubeRay "
                       "CRD schemas + semantic checks); apply, inspect and delete them on the cluster "
                       "named by KUBECONFIG.")
    s = p.add_subparsers(dest="action", required=True,
                         metavar="{render,validate,apply,status,logs,delete,commands,versions}")
    r = s.add_parser("render", help="write the manifests for a cluster size")
    r.add_argument("--workers", type=int, default=8, help="training workers, 1 CPU each (default 8)")
    r.add_argument("--cpus", type=int, default=4, help="CPUs of each Ray worker pod (default 4)")
    r.add_argument("--worker-nodes", type=int, default=2, help="Kubernetes worker nodes = worker pods (default 2)")
    r.add_argument("--memory", default="8Gi", help="memory of each worker pod (default 8Gi)")
    r.add_argument("--image", default=None, help="container image (default dtrain:<version>-ray<ray version>)")
    r.add_argument("--dataset", default="fashion-mnist", help="dataset the RayJob trains on")
    r.add_argument("--epochs", type=int, default=2, help="epochs the RayJob trains (default 2)")
    r.add_argument("--namespace", default="default", help="namespace (non-default gets a restricted Namespace)")
    r.add_argument("--out", default="manifests", metavar="DIR", help="output folder (default manifests/)")
    v = s.add_parser("validate", help="check manifests against the KubeRay CRDs and the lab's rules")
    v.add_argument("dir", nargs="?", default="manifests", help="folder of manifests (default manifests/)")
    v.add_argument("--all", action="store_true", help="list every problem, not only the first")
    for name, help_ in (("apply", "create or update the folder's objects (KUBECONFIG)"),
                        ("delete", "delete the folder's objects (KUBECONFIG)")):
        s.add_parser(name, help=help_).add_argument("dir", nargs="?", default="manifests",
                                                    help="folder of manifests (default manifests/)")
    st = s.add_parser("status", help="state of a RayJob or RayCluster and its pods")
    lg = s.add_parser("logs", help="driver output of a RayJob (submitter pod, else head)")
    for q, default in ((st, "dtrain-train"), (lg, "dtrain-train")):
        q.add_argument("name", nargs="?", default=default, help=f"object name (default {default})")
        q.add_argument("--namespace", "-n", default="default")
    lg.add_argument("--follow", "-f", action="store_true", help="keep streaming")
    s.add_parser("commands", help="every command to type on a real cluster, in order")
    s.add_parser("versions", help="pinned versions as shell assignments: eval \"$(dtrain k8s versions)\"")


def _run_k8s(args) -> int:
    from dtrain import k8s

    if args.action == "render":
        paths = k8s.render(args.workers, args.cpus, args.memory, args.image or k8s.DEFAULT_IMAGE, args.dataset,
                           args.epochs, args.namespace, args.worker_nodes, args.out)
        print("\n".join(f"wrote {path}" for path in paths))
    elif args.action == "validate":
        from dtrain import k8s_validate

        docs = k8s_validate.load_documents(args.dir)
        problems = k8s_validate.validate_documents(docs)
        if problems and args.all:
            print("\n".join(problems))
        if problems:
            more = f" (+{len(problems) - 1} more; --all lists them)" if len(problems) > 1 else ""
            raise k8s_validate.ManifestError(problems[0] + more)
        print(f"OK {len(docs)} objects")
    elif args.action in ("apply", "delete"):
        from dtrain import k8s_api

        print("\n".join(getattr(k8s_api, args.action)(args.dir)))
    elif args.action == "status":
        from dtrain import k8s_api

        _print_json(k8s_api.status(args.name, args.namespace))
    elif args.action == "logs":
        from dtrain import k8s_api

        for chunk in k8s_api.logs(args.name, args.namespace, follow=args.follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    elif args.action == "commands":
        print(k8s.format_commands())
    else:
        print("\n".join(f"{key}={value}" for key, value in k8s.versions().items()))
    return 0


# --- dtrain cluster ------------------------------------------------------------------------
def _cluster(sub) -> None:
    p = sub.add_parser("cluster", help="the local multi-node Ray cluster", description="A local Ray "
                       "cluster shaped like KubeRay's: a head with 0 CPUs plus worker nodes, token auth, "
                       "everything on 127.0.0.1 (state in .dtrain/ray/).")
    s = p.add_subparsers(dest="action", required=True, metavar="{up,status,down,env}")
    up = s.add_parser("up", help="start head + worker nodes (no-op when already up)")
    up.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    up.add_argument("--cpus-per-node", type=int, default=4, help="logical CPUs per worker node (default 4)")
    up.add_argument("--object-store-mb", type=int, default=400, help="object store per node (default 400)")
    s.add_parser("status", help="nodes, resources, dashboard URL, memory in use")
    s.add_parser("down", help="stop every process of this cluster and remove its state")
    s.add_parser("env", help="print export lines for clients: eval \"$(dtrain cluster env)\"")


def _format_cluster(info: dict) -> str:
    """Human-readable summary of cluster.status()."""
    if not info["running"]:
        return "no local Ray cluster (start one with 'dtrain cluster up')"
    lines = [f"address {info['address']}   dashboard/Jobs API {info['dashboard_url']}   auth {info['auth_mode']}"]
    lines += [f"  {n['name']:<10} {'alive' if n['alive'] else 'DEAD':<6} CPU {n['cpus']:>4g}   memory "
              f"{n['memory_gb']:.1f} GB   object store {n['object_store_gb']:.2f} GB" for n in info["nodes"]]
    if "resources" in info:
        total, free = info["resources"]["total"], info["resources"]["available"]
        lines.append(f"CPUs {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}   "
                     f"{info['alive_nodes']} nodes alive   {info['processes']} processes, "
                     f"{info['memory_mb']} MB in use")
    if info.get("problem"):
        lines.append(f"problem: {info['problem']}")
    return "\n".join(lines)


def _run_cluster(args) -> int:
    from dtrain import cluster

    if args.action == "up":
        info = cluster.up(workers=args.workers, cpus_per_node=args.cpus_per_node,
                          object_store_mb=args.object_store_mb)
        print(_format_cluster(info))
        if info.get("up_seconds") is not None:
            print(f"started in {info['up_seconds']} s")
    elif args.action == "status":
        print(_format_cluster(cluster.status()))
    elif args.action == "down":
        print(cluster.down())
    else:
        print(cluster.env_exports())
    return 0


# --- dtrain train ----------------------------------------------------------------------------
def _at_least_one(text: str) -> int:
    """argparse type: a whole number ≥ 1 (so a bad count fails before anything starts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _train(sub) -> None:
    p = sub.add_parser("train", help="train the classifier with Ray Train", description="Submit the training "
                       "driver as a Ray job (local cluster, $RAY_ADDRESS or --address), follow its logs and "
                       "print the final metrics. The model lands in s3://models/<run-id>/.")
    p.add_argument("--dataset", default="fashion-mnist", help="mnist or fashion-mnist (default fashion-mnist)")
    p.add_argument("--workers", type=_at_least_one, default=2, help="training workers (default 2)")
    p.add_argument("--epochs", type=_at_least_one, default=2, help="passes over the training set (default 2)")
    p.add_argument("--cpus-per-worker", type=_at_least_one, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--batch-size", type=_at_least_one, default=256,
                   help="global batch, split over the workers (default 256)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--address", default=None, help="Ray Jobs API URL (default: $RAY_ADDRESS or the local cluster)")
    p.add_argument("--run-id", default=None, help="name of the run (default <dataset>-<UTC time>-<random>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--driver", action="store_true", help="run the job driver in this process (the job's entrypoint)")
    how.add_argument("--local", action="store_true", help="train in this process without Ray (world size 1)")
    # Tests and benchmarks: JSON of other run settings (train_samples, fail_at_epoch, …).
    p.add_argument("--extra-config", default=None, help=argparse.SUPPRESS)


def _format_training(result: dict) -> str:
    """The end-of-run summary: accuracy, where the model is, and where the time went."""
    final, t = result["final"], result.get("timings", {})
    epochs = ", ".join(f"{s:.1f}" for s in t.get("epoch_time_s", []))
    lines = [f"run {result['run_id']}: test accuracy {final['test_accuracy']:.4f}, test loss "
             f"{final['test_loss']:.4f} after {final['epoch']} epochs on {result['workers']} workers"]
    if result.get("model_uri"):
        lines.append(f"model {result['model_uri']}   last checkpoint {result['checkpoint']}")
    if result.get("resumed_from_epoch"):
        lines.append(f"resumed from the checkpoint of epoch {result['resumed_from_epoch']} after a failure")
    times = [("submit → first step", t.get("submit_to_first_step_s")), ("epochs", epochs or None),
             ("total", t.get("total_s") or t.get("driver_total_s"))]
    lines.append("seconds: " + "   ".join(f"{k} {v if isinstance(v, str) else round(v, 1)}"
                                         for k, v in times if v is not None))
    return "\n".join(lines)


def _run_train(args) -> int:
    from dtrain import train

    if args.driver:
        from dtrain import submit

        train.driver_main(argparse.Namespace(**{**vars(args), "run_id": args.run_id or
                                                submit.make_run_id(args.dataset)}))
        return 0
    if args.local:
        history = train.run_local({**train.check_extra(args.extra_config), "dataset": args.dataset, "epochs": args.epochs, "lr": args.lr,
                                   "batch_size": args.batch_size, "cpus_per_worker": args.cpus_per_worker})
        result = {"run_id": "local", "workers": 1, "final": history[-1], "history": history,
                  "timings": {"epoch_time_s": [m["epoch_time_s"] for m in history],
                              "total_s": history[0]["data_load_s"] + sum(m["epoch_time_s"] for m in history)}}
    else:
        from dtrain import submit

        result = submit.submit(args.dataset, args.workers, args.epochs, address=args.address,
                               cpus_per_worker=args.cpus_per_worker, batch_size=args.batch_size, lr=args.lr,
                               run_id=args.run_id, progress=not args.no_progress)
    print(json.dumps(result, indent=2, sort_keys=True, default=str) if args.json else _format_training(result))
    return 0


# --- dispatch --------------------------------------------------------------------------------
GROUPS = {"s3": (_s3, _run_s3), "data": (_data, _run_data), "bucket": (_bucket, _run_bucket), "evaluate": (_evaluate, _run_evaluate),
          "k8s": (_k8s, _run_k8s), "cluster": (_cluster, _run_cluster), "train": (_train, _run_train)}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dtrain", description="Distributed MNIST training with Ray Train, KubeRay and "
                     "MinIO. Every notebook step is a command here; each has --help.")
    parser.add_argument("--version", action="version", version=f"dtrain {PACKAGE_VERSION}")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    for register, _ in GROUPS.values():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return GROUPS[args.group][1](args) or 0
    except DtrainError as exc:
        print(f"dtrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
