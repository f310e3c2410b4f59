"""How many llama contexts (replicas) a model gets, and how many compute threads each decode
gets: a pure policy over what the machine can give.

Why it matters (measured on 2 cores with the bundled MiniLM f16 model): llama.cpp's compute
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
- only one thread in the process ever runs a batch with more than one compute thread (the
  first to do so; a model's lowest free replica asks first): llama.cpp's CPU backend meets at
  OpenMP barriers, and libgomp throttles its spin-waiting to almost nothing once the process
  has more OpenMP threads than CPUs, which a second multi-threaded replica brings about (each
  becomes the master of a team of its own). Measured here: after a bulk run in which both
  replicas had borrowed a core, every later lone query took p50 9.5-10.4 ms instead of 3.8-4.5
  (worse than one thread, 6.8-7.6), in 3 of 7 runs;
- the user's `threads` setting always wins, within the budget and never above the cores.

What counts as competition, averaged over the last `SAMPLE_WINDOW`: the CPU time of other
processes (the machine's, from /proc/stat, less this process's own and its model processes':
llama.cpp's OpenMP workers
spinning after a batch are not competition, and counting them made the daemon halve its own
threads, W1 0.75x), in whole cores; plus our event loop when it was busy more than half the
window (a cache-hit flood keeps it on a core for seconds: counting it as idle gave queries two
threads against it and a query p99 of 540 ms during a cache-hit flood).

OpenMP's spin-waiting is left at its default: the previous measurements found
`OMP_WAIT_POLICY=PASSIVE` 20% slower in bulk and short spin counts slower everywhere, and with
no more threads than free cores the spinning no longer steals a core from anyone.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
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
# The window over which the load of other processes and of our event loop is averaged
# (seconds): /proc/stat counts in ticks of 10 ms, so 100 ms resolves a tenth of a core, and a
# process that starts competing costs at most this long of batches with too many threads.
SAMPLE_WINDOW = 0.1
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Machine:
    """What the policy reads of the machine; `sample()` fills it, tests build it by hand."""

    affinity: int  # CPUs in this process's affinity mask
    quota: float | None  # CPUs the cgroup lets us use (None: no quota)
    others: int  # runnable threads of other processes right now


def machine_cpus(affinity: int, quota: float | None) -> int:
    """Whole CPUs this process may use: its affinity, cut by a cgroup quota (floored: 1.5 CPUs
    of quota cannot keep two threads busy), at least 1. No `threads` or `replicas` setting
    goes above it (config.fit_to_cores)."""
    cpus = affinity if quota is None else min(affinity, math.floor(quota))
    return max(1, cpus)


def usable_cpus(affinity: int, quota: float | None) -> int:
    """The cores the budget hands out: `machine_cpus`, at most MAX_AUTO_THREADS."""
    return min(machine_cpus(affinity, quota), MAX_AUTO_THREADS)


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
    # Whether the thread that will run it may run more than one compute thread: only one
    # thread in the process ever does (see the module's docstring: libgomp).
    wide: bool = True


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
        # More threads than cores only wait for each other at llama.cpp's barriers.
        wanted = min(launch.configured, machine_cpus(machine.affinity, machine.quota))
        fits = in_use + wanted + reserve <= usable
        return wanted if fits or in_use == 0 else 0
    free = usable - in_use - machine.others - reserve
    if free < 1:
        # A query starts on any core our own decodes leave; bulk only when none of ours run.
        return 1 if launch.interactive or in_use == 0 else 0
    if not launch.wide:
        return 1
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


def read_busy_cpu_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds every process on the machine has run (the `cpu` line of /proc/stat: all
    but idle and iowait), None where /proc/stat is absent."""
    try:
        with stat.open("rb") as f:
            fields = f.readline().split()
        if fields[0] != b"cpu":
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds every thread of this process has run (llama.cpp's workers included)."""
    t = os.times()
    return t.user + t.system


def read_process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process has run (utime + stime of /proc/PID/stat), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU seconds of the live child processes `pids`, plus those of the ones that ended (the
    kernel adds a reaped child's time to ours): one figure that never jumps when one ends."""
    live = sum(read_process_cpu_seconds(pid) or 0.0 for pid in pids)
    t = os.times()
    return live + t.children_user + t.children_system


def whole_cores(cpu_seconds: float, wall_seconds: float) -> int:
    """A load as whole cores: a core counts once it is busy more than half the window."""
    if wall_seconds <= 0:
        return 0
    load = max(0.0, cpu_seconds / wall_seconds)
    return int(load) + (1 if load - int(load) > 0.5 else 0)


def read_thread_cpu_ns(tid: int, tasks: Path = Path("/proc/self/task")) -> int | None:
    """Nanoseconds a thread of this process has run (`schedstat`'s first field), None where
    the kernel does not say."""
    try:
        return int((tasks / str(tid) / "schedstat").read_bytes().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class Sampler:
    """Reads the machine before each batch: the affinity and the quota once (they change only
    when an operator changes them), the load of other processes and of our event loop as
    averages over the last `SAMPLE_WINDOW` (recomputed once a window has passed: a few reads
    of /proc, against a batch's milliseconds).

    Averages, not the run queue at the instant of the batch: at that instant the client that
    just sent the request is often still runnable on its way into `recv`, and counting it
    gave every lone query one thread instead of two (idle p50 4.1 vs 2.9 ms in-process).
    """

    def __init__(
        self,
        service_tid: int | None = None,
        children: Callable[[], float] | None = None,
    ) -> None:
        self.affinity = read_affinity()
        self.quota = read_quota()
        # CPU seconds of our model processes (they compute our batches: not competition).
        self._children = children
        # The event loop's thread id (None: not measured).
        self._service_tid = service_tid
        self._mark: tuple[float, float | None, float, int | None] | None = None
        self._others = 0

    def sample(self) -> Machine:
        now = time.monotonic()
        mark = self._mark
        if mark is not None and now - mark[0] < SAMPLE_WINDOW:
            return Machine(self.affinity, self.quota, self._others)
        busy = read_busy_cpu_seconds()
        own = own_cpu_seconds() + (self._children() if self._children is not None else 0.0)
        service = None if self._service_tid is None else read_thread_cpu_ns(self._service_tid)
        if mark is not None:
            wall = now - mark[0]
            others = 0
            # Without /proc/stat (macOS), assume nobody else runs.
            if busy is not None and mark[1] is not None:
                others = whole_cores((busy - mark[1]) - (own - mark[2]), wall)
            if service is not None and mark[3] is not None:
                others += whole_cores((service - mark[3]) / 1e9, wall)
            self._others = others
        self._mark = (now, busy, own, service)
        return Machine(self.affinity, self.quota, self._others)
