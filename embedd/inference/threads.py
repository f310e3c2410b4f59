"""How many llama contexts (replicas) a model gets, and how many compute threads each decode
gets: a pure policy over what the machine can give.

Why it matters (NOTES.md and issue 19, measured here, 2 cores, MiniLM f16): llama.cpp's compute
threads meet at a barrier many times per batch, so with as many threads as cores, any other
runnable thread (the app, the indexer's client, our own busy event loop) stalls every barrier.
A query took p50 94 ms (max 292 ms) with 2 threads while one unrelated process kept one core
busy, and p50 6.6 ms (max 8 ms) with 1 thread. Two one-thread contexts computing side by side
did 58 chunks/s where one two-thread context did 45 (1.28x: no barriers between threads), and a
query on one of them while the other ran bulk took p50 5 ms instead of waiting for the bulk
batch; a lone query on an idle machine is still faster with both cores (2.8 vs 4.3 ms). Hence:

- **replicas**: one context per usable core (at most `MAX_AUTO_REPLICAS`), or per `threads`
  cores when the user fixed `threads`; one for a model on a GPU;
- **threads per decode**, chosen when a replica starts a batch, from one budget of cores shared
  by every model and replica (`budget.py` holds the count): never more threads of ours than the
  usable cores (the affinity mask and the cgroup quota, never `os.cpu_count()`); the cores left
  by our running decodes and by other processes' runnable threads are split between the
  batches starting together, so a lone batch borrows idle replicas' cores and a full queue runs
  every replica on one thread each;
- while interactive work is recent, bulk leaves one core (`RESERVED_FOR_QUERIES`) to queries,
  so a query starts at once on a free replica instead of waiting for a bulk batch to end: a
  llama batch cannot be interrupted (its abort callback would run Python, taking the GIL, at
  every graph node);
- a query never waits for other processes (they are not ours to wait for): it waits only while
  our own decodes fill every usable core; bulk waits whenever nothing is free but our own
  decodes run (one of them ending frees a core);
- the user's `threads` setting always wins, within the budget.

What counts as competition: `procs_running` in /proc/stat less this process's own runnable
threads (llama.cpp's OpenMP workers still spinning after a batch and our event loop handing over
a request are not competition: counting them made the daemon halve its own threads, W1 0.75x,
idle p50 7 ms vs 3 ms), seen in two samples in a row; plus our event loop when it has been busy
more than half of the last `SERVICE_WINDOW` (a cache-hit flood keeps it on a core for seconds:
counting it as idle gave queries two threads against it and p99 540 ms, issue 19's W4).

OpenMP's spin-waiting is left at its default: the previous measurements found
`OMP_WAIT_POLICY=PASSIVE` 20% slower in bulk and short spin counts slower everywhere, and with
no more threads than free cores the spinning no longer steals a core from anyone.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

# More threads than this stop paying for embedding models (small matrices; llama.cpp's own
# default caps at 8 as well).
MAX_AUTO_THREADS = 8
# Contexts per model when the config does not say: one per usable core, up to this. Each extra
# one costs only its compute buffers (measured: README, Replicas); past 16 the cores are better
# spent as several threads per batch than as more queues to fill.
MAX_AUTO_REPLICAS = 16
# Cores bulk leaves free while interactive work is recent: one query's batch needs one.
RESERVED_FOR_QUERIES = 1
# How long after the last interactive request bulk keeps leaving that core free (seconds): a
# user typing sends a query every few hundred milliseconds; bulk gets the core back a second
# after the last one.
INTERACTIVE_RECENT = 1.0
# The window over which our event loop's busy fraction is measured (seconds).
SERVICE_WINDOW = 0.1
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


def replicas_for(
    usable: int,
    *,
    configured: int | None = None,
    threads: int | None = None,
    gpu_offloaded: bool = False,
) -> int:
    """How many llama contexts a model gets (see the module's docstring for why)."""
    if configured is not None:
        return configured
    if gpu_offloaded:
        return 1  # the GPU runs one batch at a time anyway; a second context only costs VRAM
    return max(1, min(MAX_AUTO_REPLICAS, usable // (threads or 1)))


@dataclass(frozen=True)
class Launch:
    """A batch a replica is about to start."""

    interactive: bool
    # Batches of this model starting together (its free replicas with work for them): they
    # split the free cores between them.
    share: int = 1
    # The model's `threads` setting, if fixed.
    configured: int | None = None
    gpu_offloaded: bool = False


def threads_for_launch(
    machine: Machine, in_use: int, launch: Launch, *, interactive_recent: bool
) -> int:
    """Compute threads for a batch about to start, given the threads our running decodes hold
    (`in_use`); 0 means it must wait for one of them to end."""
    usable = usable_cpus(machine.affinity, machine.quota)
    if in_use >= usable:
        return 0  # our own decodes fill every core: one of them ends first
    reserve = RESERVED_FOR_QUERIES if interactive_recent and not launch.interactive else 0
    if launch.gpu_offloaded:
        return 1 if in_use + reserve < usable or in_use == 0 else 0
    if launch.configured is not None:
        fits = in_use + launch.configured + reserve <= usable
        return launch.configured if fits or in_use == 0 else 0
    free = usable - in_use - machine.others - reserve
    if free < 1:
        # A query starts on any core our own decodes leave; bulk only when none of ours run.
        return 1 if launch.interactive or in_use == 0 else 0
    return max(1, min(MAX_AUTO_THREADS, free // max(1, launch.share)))


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


def read_thread_cpu_ns(tid: int, tasks: Path = Path("/proc/self/task")) -> int | None:
    """Nanoseconds a thread of this process has run (`schedstat`'s first field), None where
    the kernel does not say."""
    try:
        return int((tasks / str(tid) / "schedstat").read_bytes().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def busy_cores(cpu_ns: int, wall_ns: int) -> int:
    """A thread's load as whole cores: busy more than half the window counts as one."""
    return 1 if wall_ns > 0 and 2 * cpu_ns > wall_ns else 0


class Sampler:
    """Reads the machine before each batch: the run queues every time (tens of microseconds,
    against a batch's milliseconds), the affinity and the quota once (they change only when an
    operator changes them), and the event loop's CPU time once per `SERVICE_WINDOW`."""

    def __init__(self, service_tid: int | None = None) -> None:
        self.affinity = read_affinity()
        self.quota = read_quota()
        self._last_others = 0
        # The event loop's thread id (None: not measured).
        self._service_tid = service_tid
        self._service_mark: tuple[int, int] | None = None
        self._service_load = 0

    def sample(self) -> Machine:
        running = read_running()
        # Without a run queue to read (macOS), assume nobody else runs.
        now = 0 if running is None else max(0, running - read_own_running())
        # Only load seen in two samples in a row counts: a client that runs for a moment
        # (a search sending its next query) should not halve a bulk batch's threads, while a
        # busy process is there at every sample.
        others, self._last_others = min(now, self._last_others), now
        return Machine(self.affinity, self.quota, others + self._service())

    def _service(self) -> int:
        """Our event loop's load in whole cores, over the last window that has ended."""
        if self._service_tid is None:
            return 0
        cpu = read_thread_cpu_ns(self._service_tid)
        if cpu is None:
            return 0
        wall = time.monotonic_ns()
        mark = self._service_mark
        if mark is None:
            self._service_mark = (wall, cpu)
        elif wall - mark[0] >= SERVICE_WINDOW * 1e9:
            self._service_load = busy_cores(cpu - mark[1], wall - mark[0])
            self._service_mark = (wall, cpu)
        return self._service_load
