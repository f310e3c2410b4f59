"""How many compute threads a llama batch gets: a pure policy over what the machine can give.

Why it matters (NOTES.md, measured here, 2 cores, MiniLM f16): llama.cpp's compute threads meet
at a barrier many times per batch, so with as many threads as cores, any other runnable thread
(the app, the indexer's client, our own event loop) stalls every barrier. A query took p50 94 ms
(max 292 ms) with 2 threads while one unrelated process kept one core busy, and p50 6.6 ms
(max 8 ms) with 1 thread; on an idle machine 2 threads are the faster choice (p50 ~4-6 ms, and
bulk throughput scales with cores). So the count is chosen per batch from the cores that are
free right now:

- the ceiling is the CPUs this process may use: its affinity mask and its cgroup CPU quota
  (a container limited to 1.5 CPUs has 1 whole CPU to spend), never `os.cpu_count()`, and at
  most `MAX_AUTO_THREADS`;
- minus the other runnable threads in the machine's run queue (`procs_running` in /proc/stat,
  read before each batch, less this model thread itself), never below 1;
- a model fully offloaded to a GPU needs one CPU thread to drive it;
- the user's `threads` setting always wins.

OpenMP's spin-waiting is left at its default: the previous measurements found
`OMP_WAIT_POLICY=PASSIVE` 20% slower in bulk and short spin counts slower everywhere, and with
no more threads than free cores the spinning no longer steals a core from anyone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# More threads than this stop paying for embedding models (small matrices; llama.cpp's own
# default caps at 8 as well).
MAX_AUTO_THREADS = 8
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Machine:
    """What the policy reads of the machine; `sample()` fills it, tests build it by hand."""

    affinity: int  # CPUs in this process's affinity mask
    quota: float | None  # CPUs the cgroup lets us use (None: no quota)
    running: int  # runnable threads in the whole machine right now, ourselves included


def usable_cpus(affinity: int, quota: float | None) -> int:
    """Whole CPUs this process may use: its affinity, cut by a cgroup quota (floored: 1.5 CPUs
    of quota cannot keep two threads busy), at least 1, at most MAX_AUTO_THREADS."""
    cpus = affinity if quota is None else min(affinity, math.floor(quota))
    return max(1, min(cpus, MAX_AUTO_THREADS))


def threads_for_batch(
    machine: Machine, *, configured: int | None = None, gpu_offloaded: bool = False
) -> int:
    """Compute threads for the next batch (see the module's docstring for why)."""
    if configured is not None:
        return configured
    if gpu_offloaded:
        return 1
    ceiling = usable_cpus(machine.affinity, machine.quota)
    # The model thread itself is running (it is the one asking): everyone else is competition.
    others = max(0, machine.running - 1)
    return max(1, min(ceiling, machine.affinity - others))


def read_affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def read_quota(root: Path = _CGROUP) -> float | None:
    """The cgroup CPU quota in CPUs: v2 `cpu.max` ("max 100000" or "150000 100000"), else v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`; None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def read_running(stat: Path = Path("/proc/stat")) -> int | None:
    """Runnable threads machine-wide (`procs_running`), None where /proc/stat is absent."""
    try:
        with stat.open("rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class Sampler:
    """Reads the machine before each batch: the run queue every time (a few microseconds), the
    affinity and the quota once (they change only when an operator changes them)."""

    def __init__(self) -> None:
        self.affinity = read_affinity()
        self.quota = read_quota()

    def sample(self) -> Machine:
        running = read_running()
        # Without a run queue to read (macOS), assume nobody else runs.
        return Machine(self.affinity, self.quota, 1 if running is None else running)
