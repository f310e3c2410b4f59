"""What a model's threads have done: counts, throughput and recent timings, which `stats`,
`embedd status` and `/metrics` report and admission's `retry_after` is estimated from.

Written by the model's coordinating thread, read by the event loop: deque appends and copies
are atomic under the GIL, so a reader sees a consistent list without a lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Recent requests whose latency percentiles `stats` reports (a bounded reservoir: the newest).
_LATENCY_SAMPLES = 2048
# The window (seconds) of the busy fractions.
_BUSY_WINDOW = 60
# Before the first batch has been timed, assume the throughput measured on a 2-core machine
# (MiniLM-L6 f16, 2 threads: ~5,000 tokens/s).
INITIAL_TOKENS_PER_SECOND = 5000.0


@dataclass
class ReplicaStats:
    """One llama context's share of the work (`stats` lists them; `embedd bench` turns the
    busy seconds into each replica's busy fraction over a workload)."""

    batches: int = 0
    # Seconds spent computing since the daemon started (never reset: a reader takes
    # differences), and the same per second of the clock for the last minute.
    busy_seconds: float = 0.0
    busy: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=_BUSY_WINDOW))
    # Threads the last batch ran with, and whether one is running now.
    last_threads: int = 0
    computing: bool = False

    def record(self, now: float, seconds: float, threads: int) -> None:
        self.batches += 1
        self.busy_seconds += seconds
        self.last_threads = threads
        _add_busy(self.busy, now, seconds)

    def busy_fraction(self, now: float) -> float:
        return _fraction(self.busy, now)


@dataclass
class WorkerStats:
    """Counts and recent timings of one model; owned by its slot, so they survive unloading
    and reloading."""

    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    batches: int = 0
    cancelled: int = 0
    tokens_per_second: float = INITIAL_TOKENS_PER_SECOND
    # Whether `tokens_per_second` comes from a well-filled batch yet, or is still the guess.
    throughput_measured: bool = False
    # Compute threads the last batch ran with.
    last_threads: int = 0
    # Batches started (they end in `batches`).
    launched: int = 0
    # Rerank requests queued (also counted in `requests`), and the query/document pairs they
    # became (a document too long for the model is several pairs).
    reranks: int = 0
    pairs: int = 0
    # One entry per llama context of the loaded model.
    replicas: list[ReplicaStats] = field(default_factory=list)
    # Bulk batches that started after an interactive request had arrived and ended before it
    # was answered (the scheduler's promise is none), and the interactive requests that
    # arrived while bulk was computing (how often that promise was put to the test).
    bulk_overtook_queries: int = 0
    queries_during_bulk: int = 0
    # The model process: how often one started, died, and was started again after dying; inputs
    # found to kill it, and inputs refused because they had.
    process_starts: int = 0
    # Canary batches computed (once per file, llama.cpp build and CPU: `canary.py`).
    canaries: int = 0
    crashes: int = 0
    restarts: int = 0
    poison_found: int = 0
    poison_refused: int = 0
    # Seconds per recent batch that the process boundary itself cost: from the batch's send to
    # its vectors' arrival, less the decode's own time inside the process.
    boundary: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES))
    # (queue wait, compute, total) seconds of recent embed requests.
    latencies: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES)
    )

    def latency_ms(self) -> dict[str, dict[str, float]]:
        rows = list(self.latencies)
        out: dict[str, dict[str, float]] = {}
        for i, name in enumerate(("queue_wait", "compute", "total")):
            values = sorted(r[i] for r in rows)
            if values:
                out[name] = {
                    f"p{q}": round(1000 * values[min(len(values) - 1, len(values) * q // 100)], 3)
                    for q in (50, 95, 99)
                }
        return out

    def boundary_us(self) -> dict[str, float]:
        """Percentiles of the process boundary's cost per batch, in microseconds."""
        values = sorted(self.boundary)
        if not values:
            return {}
        return {
            f"p{q}": round(1e6 * values[min(len(values) - 1, len(values) * q // 100)], 1)
            for q in (50, 99)
        }

    def busy_fraction(self, now: float) -> float:
        """The model's contexts' mean busy fraction (1.0: every replica computing all minute)."""
        fractions = [r.busy_fraction(now) for r in self.replicas]
        return round(sum(fractions) / len(fractions), 4) if fractions else 0.0

    def replica(self, index: int) -> ReplicaStats:
        while len(self.replicas) <= index:
            self.replicas.append(ReplicaStats())
        return self.replicas[index]


def _add_busy(busy: deque[tuple[int, float]], now: float, seconds: float) -> None:
    second = int(now)
    if busy and busy[-1][0] == second:
        busy[-1] = (second, busy[-1][1] + seconds)
    else:
        busy.append((second, seconds))


def _fraction(busy: deque[tuple[int, float]], now: float) -> float:
    since = int(now) - _BUSY_WINDOW
    seconds = sum(s for second, s in list(busy) if second > since)
    return round(min(1.0, seconds / _BUSY_WINDOW), 4)
