"""The pins that must agree, and the set-up that must be idempotent."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from dtrain import versions

REPO = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(3)
    return pins


def test_environment_yml_agrees_with_the_lock():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    lock = _lock()
    assert len(pip) >= 10
    for spec in pip:
        name, version = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(.+)$", spec).groups()
        assert lock.get(name.lower()) == version, f"environment.yml pins {spec}, the lock has {lock.get(name)}"


def test_ray_and_torch_pins_agree_everywhere():
    import ray
    import torch

    lock = _lock()
    assert lock["ray"] == versions.RAY_VERSION == ray.__version__
    assert lock["torch"] == versions.TORCH_VERSION == torch.__version__.split("+")[0]
    assert versions.RAY_IMAGE == f"rayproject/ray:{versions.RAY_VERSION}-py311-cpu"
    assert f"ray[default,train]=={versions.RAY_VERSION}" in (REPO / "pyproject.toml").read_text()
    assert "torchvision" not in lock


def test_second_setup_does_no_work():
    out = subprocess.run(["make", "--no-print-directory", "setup"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "setup:" not in out.stdout, f"make setup redid work:\n{out.stdout}"
