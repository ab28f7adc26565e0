"""Peak resident memory of the whole local stack, sampled while the Ray runs train.

"The stack" is every process the lab runs besides the notebook or benchmark process:
the MinIO server, the Ray head and worker nodes (raylets, GCS, dashboard, agents) and
the Ray worker processes that train — found as descendants of the processes whose
command line names the cluster's temp folder or the MinIO pid. RSS summed over processes
counts pages they share (Ray's object store in /dev/shm, shared libraries) once per
process, so the sum is an upper bound of what the stack really occupies; the sampler
therefore also sums PSS (each shared page split between its users), which adds up to
the memory the stack really holds, and names the biggest processes at the RSS peak.
"""

from __future__ import annotations

import os
import threading

import psutil


def _descendants(roots: list[psutil.Process]) -> dict[int, psutil.Process]:
    found = {}
    for proc in roots:
        found[proc.pid] = proc
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            pass
    return found


def stack_processes(minio_pid: int | None, ray_temp_dir: str | None) -> list[psutil.Process]:
    """MinIO's process tree plus every Ray process of the cluster living in ``ray_temp_dir``."""
    roots = []
    if minio_pid:
        try:
            roots.append(psutil.Process(minio_pid))
        except psutil.Error:
            pass
    if ray_temp_dir:
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid != os.getpid() and ray_temp_dir in " ".join(proc.info["cmdline"] or []):
                roots.append(proc)
    return list(_descendants(roots).values())


def _label(proc: psutil.Process) -> str:
    """A short name: Ray renames its workers (``ray::RayTrainWorker``), others by program."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "?"
    first = cmdline[0] if cmdline else proc.name()
    if first.startswith("ray::"):
        return first.split()[0]
    script = next((part for part in cmdline[1:3] if part.endswith(".py") or part.startswith("-")), "")
    return f"{first.rsplit('/', 1)[-1]} {script.rsplit('/', 1)[-1]}".strip()


def measure(processes: list[psutil.Process], with_pss: bool) -> dict:
    """Summed RSS (and PSS when asked: it reads smaps, slower) with per-process RSS."""
    rss, pss, each = 0, 0, []
    for proc in processes:
        try:
            if with_pss:
                info = proc.memory_full_info()
                pss += info.pss
            else:
                info = proc.memory_info()
        except psutil.Error:
            continue
        rss += info.rss
        each.append((info.rss, proc))
    return {"rss": rss, "pss": pss if with_pss else None, "each": each}


class PeakSampler(threading.Thread):
    """Background thread summing the stack's RSS every ``interval_s``; keeps the peak.

    Use as a context manager around the runs to watch. The process list is refreshed
    at every sample because Ray starts and ends worker processes with each job.
    """

    # PSS needs /proc/<pid>/smaps: read it every few samples only, to stay light.
    PSS_EVERY = 3

    def __init__(self, minio_pid: int | None, ray_temp_dir: str | None, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.minio_pid, self.ray_temp_dir, self.interval_s = minio_pid, ray_temp_dir, interval_s
        self.peak_bytes, self.peak_pss_bytes, self.peak_processes, self.samples = 0, 0, 0, 0
        self.top: list[dict] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            procs = stack_processes(self.minio_pid, self.ray_temp_dir)
            sample = measure(procs, with_pss=self.samples % self.PSS_EVERY == 0)
            if sample["rss"] > self.peak_bytes:
                self.peak_bytes, self.peak_processes = sample["rss"], len(procs)
                biggest = sorted(sample["each"], key=lambda pair: pair[0], reverse=True)[:8]
                self.top = [{"process": _label(proc), "rss_mib": round(rss / 2**20)} for rss, proc in biggest]
            self.peak_pss_bytes = max(self.peak_pss_bytes, sample["pss"] or 0)
            self.samples += 1
            self._stop_event.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_event.set()
        self.join(timeout=10)

    def result(self) -> dict:
        return {"peak_rss_gib": round(self.peak_bytes / 2**30, 3),
                "peak_pss_gib": round(self.peak_pss_bytes / 2**30, 3), "peak_processes": self.peak_processes,
                "top_at_peak": self.top, "samples": self.samples, "interval_s": self.interval_s}

