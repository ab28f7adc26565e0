"""Where things live and how settings are read.

Two rules:
* Everything the lab writes at run time goes under one git-ignored state folder,
  ``.dtrain/`` at the project root (override with ``DTRAIN_HOME``), so a clean clone
  stays clean and ``rm -rf .dtrain`` resets the lab.
* S3 settings use the four names of the Kubernetes Secret ``minio-credentials``
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_REGION``), so the same code reads them on a laptop and inside a pod.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dtrain.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent.parent

DATASETS_BUCKET = "datasets"
MODELS_BUCKET = "models"
CHECKPOINTS_BUCKET = "checkpoints"
DEFAULT_REGION = "us-east-1"

S3_ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")


def state_dir() -> Path:
    """The git-ignored folder holding credentials, server data, logs and run outputs."""
    path = Path(os.environ.get("DTRAIN_HOME", PROJECT_ROOT / ".dtrain")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def tools_dir() -> Path:
    """Project-local binaries (the MinIO server built by ``make setup``)."""
    return Path(os.environ.get("DTRAIN_TOOLS", PROJECT_ROOT / "tools")).resolve()


def cache_dir() -> Path:
    """Downloaded and decompressed datasets."""
    path = Path(os.environ.get("DTRAIN_CACHE", state_dir() / "cache")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: Path, data: dict, mode: int = 0o600) -> None:
    """Write JSON so that readers see the old file or the new one, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """Read a JSON state file, or None when it does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"state file {path} is corrupt ({exc}); delete it and retry") from exc


@dataclass(frozen=True)
class S3Settings:
    """How to reach the S3 store. ``ca_bundle`` is set for HTTPS with a private CA."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION
    ca_bundle: str | None = None

    @property
    def secure(self) -> bool:
        return self.endpoint_url.startswith("https://")

    @property
    def host_port(self) -> str:
        """The endpoint without its scheme: what pyarrow's ``endpoint_override`` wants."""
        return self.endpoint_url.split("://", 1)[-1].rstrip("/")

    def as_env(self) -> dict[str, str]:
        """The settings as the Secret's environment variables (plus the CA bundle)."""
        env = dict(zip(S3_ENV_KEYS, (self.endpoint_url, self.access_key, self.secret_key, self.region), strict=True))
        if self.ca_bundle:
            env["AWS_CA_BUNDLE"] = self.ca_bundle
        return env


def s3_settings(environ: dict | None = None) -> S3Settings:
    """Settings from the environment when ``AWS_ENDPOINT_URL`` is set, else from the
    embedded server's state file written by ``dtrain s3 up``."""
    env = os.environ if environ is None else environ
    if env.get("AWS_ENDPOINT_URL"):
        missing = [k for k in S3_ENV_KEYS[1:3] if not env.get(k)]
        if missing:
            raise ConfigError(f"AWS_ENDPOINT_URL is set but {', '.join(missing)} is not")
        url = env["AWS_ENDPOINT_URL"]
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"AWS_ENDPOINT_URL must start with http:// or https://, got {url!r}")
        return S3Settings(url, env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"],
                          env.get("AWS_REGION") or DEFAULT_REGION, env.get("AWS_CA_BUNDLE") or None)
    state = read_json(state_dir() / "s3.json")
    if not state:
        raise ConfigError("no S3 endpoint: run 'dtrain s3 up' or set AWS_ENDPOINT_URL and the keys")
    return S3Settings(state["endpoint_url"], state["access_key"], state["secret_key"],
                      state.get("region", DEFAULT_REGION), state.get("ca_bundle"))
