#!/usr/bin/env python3
"""Scan the repository's files and its whole git history for committed secrets.

The original project committed an rke2 join token and S3 keys; this check, run by
`make test`, makes sure that never happens here. It looks for well-known key shapes and,
when a local install exists, for the exact credentials this machine generated.

Usage: check_secrets.py [REPO]   (exit 1 and one line per finding when something is found)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PATTERNS = {
    "AWS access key id": re.compile(r"AKIA[0-9A-Z]{16}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "rke2/k3s join token": re.compile(r"K10[0-9a-f]{40,}"),
    "MinIO default credentials": re.compile("minio" + "admin"),
    "hard-coded secret": re.compile(
        r"""(?i)(secret|password|passwd|token)[_-]?(access)?[_-]?(key)?["' ]*[:=]\s*["']([A-Za-z0-9/+_\-]{16,})["']"""),
}


def _generated_credentials(repo: Path) -> list[str]:
    """The keys `dtrain s3 up` generated on this machine: they must appear in no committed file."""
    found = []
    for path in (repo / ".dtrain").glob("**/s3-credentials.json"):
        try:
            found += [v for v in json.loads(path.read_text()).values() if isinstance(v, str) and len(v) >= 12]
        except (OSError, ValueError):
            continue
    return found


def scan_text(text: str, where: str, literals: list[str]) -> list[str]:
    findings = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for name, pattern in PATTERNS.items():
            if pattern.search(line):
                findings.append(f"{where}:{lineno}: {name}")
        findings += [f"{where}:{lineno}: this machine's generated S3 credential" for lit in literals if lit in line]
    return findings


def scan_repo(repo: Path) -> list[str]:
    literals = _generated_credentials(repo)
    findings = []
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        path = repo / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        findings += scan_text(path.read_text(errors="replace"), name, literals)
    history = subprocess.run(["git", "log", "--all", "-p", "--no-color", "--format=commit %H"], cwd=repo,
                             capture_output=True, text=True, errors="replace")
    commit = "?"
    for line in history.stdout.splitlines():
        if line.startswith("commit "):
            commit = line.split()[1][:10]
        elif line.startswith("+") and not line.startswith("+++"):
            findings += [f.replace("history:1:", f"history {commit}: ") for f in
                         scan_text(line[1:], "history", literals)]
    return sorted(set(findings))


def main() -> int:
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    findings = scan_repo(repo)
    for finding in findings:
        print(f"secret-scan: {finding}")
    print(f"secret-scan: {len(findings)} finding(s) in the tree and history of {repo}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
