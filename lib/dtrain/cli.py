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


# --- dispatch --------------------------------------------------------------------------------
GROUPS = {"s3": (_s3, _run_s3)}


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
