"""Shared by the bench scripts: time a call, run one table row in a fresh interpreter.

Each row runs in its own process so that its peak memory is its own (RSS only grows) and one
row's failure (e.g. out of memory) becomes a "cannot run" cell instead of ending the table.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import threading
import time

import torch

# glibc serves every allocation above 64 KiB from mmap and unmaps it when freed: a process's
# resident peak is then its tensors' peak, not what the allocator kept (an environment variable,
# so it acts from the child process's first allocation)
TENSORS_ONLY_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}


class PeakPoller:
    """Polls read() (a memory figure in bytes) from a thread every interval_s while inside and
    keeps the peak; torch releases the GIL in its kernels, so the poll sees their allocations."""

    def __init__(self, read, interval_s: float):
        self.read, self.interval_s, self.peak = read, interval_s, read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.read())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.read())


def median_seconds(fn, repeats: int, device: torch.device, before=None) -> float:
    """Median wall time of `repeats` calls of fn() after one warm-up call, the GPU synchronised
    around each; before(): called after the warm-up (e.g. to reset peak-memory counters)."""
    fn()
    if before is not None:
        before()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_row_isolated(command: list[str]) -> dict:
    """Run `command`; its last stdout line is the row as JSON, else {"error": last stderr line}."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {"error": error[:160]}
