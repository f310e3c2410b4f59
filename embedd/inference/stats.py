"""What a model's thread has done: counts, throughput and recent timings, which `stats`,
`embedd status` and `/metrics` report and admission's `retry_after` is estimated from.

Written by the model thread, read by the event loop: deque appends and copies are atomic under
the GIL, so a reader sees a consistent list without a lock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Recent requests whose latency percentiles `stats` reports (a bounded reservoir: the newest).
_LATENCY_SAMPLES = 2048
# The window (seconds) of the model thread's busy fraction.
_BUSY_WINDOW = 60
# Before the first batch has been timed, assume the throughput measured on a 2-core machine
# (MiniLM-L6 f16, 2 threads: ~5,000 tokens/s).
INITIAL_TOKENS_PER_SECOND = 5000.0


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
    # (queue wait, compute, total) seconds of recent embed requests.
    latencies: deque[tuple[float, float, float]] = field(
        default_factory=lambda: deque(maxlen=_LATENCY_SAMPLES)
    )
    # Seconds spent computing, per whole second of the clock, for the last minute: the model
    # thread's busy fraction in constant memory however many batches run.
    busy: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=_BUSY_WINDOW))

    def record_busy(self, now: float, seconds: float) -> None:
        second = int(now)
        if self.busy and self.busy[-1][0] == second:
            self.busy[-1] = (second, self.busy[-1][1] + seconds)
        else:
            self.busy.append((second, seconds))

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

    def busy_fraction(self, now: float) -> float:
        since = int(now) - _BUSY_WINDOW
        busy = sum(seconds for second, seconds in list(self.busy) if second > since)
        return round(min(1.0, busy / _BUSY_WINDOW), 4)
