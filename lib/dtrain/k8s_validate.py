"""Validate Kubernetes manifests before a cluster sees them.

Three layers, each problem a line naming the file, the object and the field:
1. RayCluster/RayJob against the openAPIV3Schema of the KubeRay v1.7.0 CRDs (found under
   ``$KUBERAY_CRDS``, else ``../shared/kuberay-crds/v1.7.0``), with every object closed
   (``additionalProperties: false``) because the API server prunes unknown fields silently
   - a typo such as ``rayStartParam`` would otherwise vanish without a word.
2. Core kinds against a small hand-written structural schema. It is PARTIAL: required
   fields and known top-level keys only, not the full Kubernetes OpenAPI.
3. Semantic rules a schema cannot express (:mod:`dtrain.k8s_rules`).
"""

from __future__ import annotations

import copy
import os
import re
from functools import cache
from pathlib import Path

import jsonschema
import yaml

from dtrain.config import PROJECT_ROOT
from dtrain.errors import ConfigError, ManifestError
from dtrain.versions import KUBERAY_VERSION

CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
MANIFEST_SUFFIXES = (".yaml", ".yml", ".yaml.tmpl")
NODE_CONFIG = re.compile(r"^0\d-rke2-")       # rke2 node configs: not API objects
NOT_KUBERNETES = re.compile(r"^docker-compose")  # the MinIO alternative for Docker

OBJECT_META = {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
    "namespace": {"type": "string"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
# Partial schemas for the core kinds we ship: apiVersion, required fields, known keys.
CORE_KINDS = {
    "Namespace": ("v1", [], ["spec"]),
    "ServiceAccount": ("v1", [], ["automountServiceAccountToken", "imagePullSecrets", "secrets"]),
    "Secret": ("v1", [], ["type", "data", "stringData", "immutable"]),
    "Service": ("v1", ["spec"], ["spec"]),
    "Role": ("rbac.authorization.k8s.io/v1", ["rules"], ["rules"]),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", ["roleRef", "subjects"], ["roleRef", "subjects"]),
    "StatefulSet": ("apps/v1", ["spec"], ["spec"]),
}
REQUIRED_SPEC = {"StatefulSet": ["selector", "template"], "Service": ["ports"]}

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
          "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 1e-3, "": 1}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")


def parse_quantity(text, field: str = "quantity") -> float:
    """A Kubernetes quantity ("8Gi", "500m", "4") as a number (bytes or cores)."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ManifestError(f"{field}: {text!r} is not a Kubernetes quantity (e.g. 8Gi, 500m, 4)")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def format_quantity(num_bytes: float) -> str:
    """Bytes as Gi when whole, else Mi."""
    num_bytes = int(num_bytes)
    return f"{num_bytes // 2**30}Gi" if num_bytes % 2**30 == 0 else f"{num_bytes // 2**20}Mi"


def crd_dir() -> Path:
    """Where the KubeRay CRDs are: $KUBERAY_CRDS, else ../shared/kuberay-crds/v<version>."""
    candidates = [Path(os.environ["KUBERAY_CRDS"])] if os.environ.get("KUBERAY_CRDS") else []
    candidates.append(PROJECT_ROOT.parent / "shared" / "kuberay-crds" / f"v{KUBERAY_VERSION}")
    for path in candidates:
        if all((path / name).is_file() for name in CRD_FILES.values()):
            return path
    raise ConfigError(f"KubeRay v{KUBERAY_VERSION} CRDs not found in {', '.join(map(str, candidates))}: "
                      "set KUBERAY_CRDS to a folder holding " + " and ".join(CRD_FILES.values()))


def _close(schema):
    """Copy of a structural schema where every object with properties forbids unknown keys."""
    if isinstance(schema, dict):
        out = {k: _close(v) for k, v in schema.items()}
        if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_close(v) for v in schema]
    return schema


@cache
def _crd_validator(kind: str, folder: str, version: str = "v1") -> jsonschema.Draft7Validator:
    with open(Path(folder) / CRD_FILES[kind]) as handle:
        crd = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META  # the API server checks ObjectMeta itself
            schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
            return jsonschema.Draft7Validator(_close(schema))
    raise ConfigError(f"{CRD_FILES[kind]} has no version {version}")


def _path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def schema_problems(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    """'field.path: message' for every schema error; unknown fields get their own path."""
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        where = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            problems += [f"{_path([*where, key])}: unknown field" for key in error.instance if key not in known]
        else:
            problems.append(f"{_path(where)}: {error.message}")
    return problems


def core_problems(doc: dict) -> list[str]:
    """The partial structural check of a core kind."""
    kind = doc.get("kind")
    api_version, required, extra_keys = CORE_KINDS[kind]
    problems = [] if doc.get("apiVersion") == api_version else [
        f"apiVersion: {kind} needs {api_version!r}, got {doc.get('apiVersion')!r}"]
    problems += schema_problems(jsonschema.Draft7Validator(OBJECT_META), doc.get("metadata") or {})
    problems = [p if p.startswith("apiVersion") else f"metadata.{p}" for p in problems]
    known = {"apiVersion", "kind", "metadata", *extra_keys}
    problems += [f"{key}: unknown field" for key in doc if key not in known]
    problems += [f"{key}: required field missing" for key in required if key not in doc]
    spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
    problems += [f"spec.{key}: required field missing" for key in REQUIRED_SPEC.get(kind, []) if key not in spec]
    return problems


def load_documents(folder: str | Path) -> list[tuple[str, dict]]:
    """(relative file name, object) for every Kubernetes object under ``folder``, in file order."""
    root = Path(folder)
    if not root.is_dir():
        raise ManifestError(f"{folder}: not a folder of manifests")
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(MANIFEST_SUFFIXES)):
        if NODE_CONFIG.match(path.name) or NOT_KUBERNETES.match(path.name):
            continue
        rel = str(path.relative_to(root))
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{rel}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        for doc in loaded:
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ManifestError(f"{rel}: a YAML document is not a mapping")
            docs.append((rel, doc))
    if not docs:
        raise ManifestError(f"{folder}: no Kubernetes manifests (*.yaml, *.yaml.tmpl) found")
    return docs


def label(rel: str, doc: dict) -> str:
    """'file: Kind name' - the prefix of every problem about one object."""
    return f"{rel}: {doc.get('kind', '?')} {(doc.get('metadata') or {}).get('name', '?')}"


def validate_documents(docs: list[tuple[str, dict]]) -> list[str]:
    """Every problem in the objects: schema, then the semantic rules across them."""
    from dtrain.k8s_rules import semantic_problems

    problems = []
    folder = None
    for rel, doc in docs:
        kind = doc.get("kind")
        if kind in CRD_FILES:
            folder = folder or str(crd_dir())
            if doc.get("apiVersion") != "ray.io/v1":
                problems.append(f"{label(rel, doc)}: apiVersion: must be 'ray.io/v1', got {doc.get('apiVersion')!r}")
                continue
            found = schema_problems(_crd_validator(kind, folder), doc)
        elif kind in CORE_KINDS:
            found = core_problems(doc)
        else:
            found = [f"kind: {kind!r} is not a kind this lab ships (known: "
                     f"{', '.join(sorted([*CRD_FILES, *CORE_KINDS]))})"]
        problems += [f"{label(rel, doc)}: {p}" for p in found]
    return problems + semantic_problems(docs)


def validate(folder: str | Path) -> list[str]:
    """All problems found in the manifests under ``folder``; empty when they are fine."""
    return validate_documents(load_documents(folder))
