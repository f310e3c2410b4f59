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
- minus the runnable threads of *other* processes (`procs_running` in /proc/stat, read before
  each batch, less this process's own running threads: our event loop handing over a request
  and llama.cpp's OpenMP workers still spinning after the last batch are not competition, and
  counting them made the daemon halve its own threads: W1 0.75x, idle p50 7 ms vs 3 ms),
  never below 1;
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
    others: int  # runnable threads of other processes right now


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
    return max(1, min(ceiling, machine.affinity - machine.others))


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


def read_own_running(tasks: Path = Path("/proc/self/task")) -> int:
    """This process's threads that are runnable now (state R in /proc/self/task/*/stat)."""
    running = 0
    try:
        entries = list(tasks.iterdir())
    except OSError:
        return 1
    for task in entries:
        try:
            stat = (task / "stat").read_bytes()
        except OSError:
            continue
        # The state follows the command name, which is in parentheses and may hold spaces.
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"R":
            running += 1
    return max(running, 1)


class Sampler:
    """Reads the machine before each batch: the run queues every time (tens of microseconds,
    against a batch's milliseconds), the affinity and the quota once (they change only when an
    operator changes them)."""

    def __init__(self) -> None:
        self.affinity = read_affinity()
        self.quota = read_quota()
        self._last_others = 0

    def sample(self) -> Machine:
        running = read_running()
        # Without a run queue to read (macOS), assume nobody else runs.
        now = 0 if running is None else max(0, running - read_own_running())
        # Only load seen in two samples in a row counts: a client that runs for a moment
        # (a search sending its next query) should not halve a bulk batch's threads, while a
        # busy process is there at every sample.
        others, self._last_others = min(now, self._last_others), now
        return Machine(self.affinity, self.quota, others)
