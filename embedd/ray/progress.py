"""The node daemons' view of a running job, logged beside Ray Data's progress.

Ray's progress counts rows and blocks; a daemon's `stats` says what the nodes are doing:
chunks and tokens per second, what is queued, how much of the time the model computed, `busy`
answers given, and restarts. A thread in the driver polls every node's actor and logs one line
per node every `every` seconds, and a last line when it stops. A node lost from the cluster
gets a line saying so and is not asked again; a restarted daemon's counts add to its node's.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Protocol, Self


class StatsSource(Protocol):
    """Where the stats come from: NodeDaemons (embedd/ray/nodes.py), node id -> `stats`."""

    def stats(self) -> dict[str, dict[str, Any]]: ...


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _model(stats: Mapping[str, Any]) -> dict[str, int | float]:
    """The node's figures summed over its models (a job normally uses one)."""
    out: dict[str, int | float] = {
        "inputs": 0, "tokens": 0, "queue_inputs": 0, "queue_tokens": 0, "busy_fraction": 0.0,
    }  # fmt: skip
    for model in (stats.get("models") or {}).values():
        for key in out:
            out[key] += model.get(key) or 0
    return out


# The figures a node's line counts up: a daemon's totals since it started.
COUNTED = ("inputs", "tokens")


class Segments:
    """One node's counts across its daemon's restarts. A daemon's counters start at zero: a
    restarted one (another pid, or counts that went down) begins a new segment, and the
    totals are the finished segments' last figures plus the current one's, so that they
    never go down and no rate is ever negative. (What a daemon did between the last poll and
    its death is not counted: a rate may read low across a restart, never below zero.)"""

    def __init__(self) -> None:
        self.finished: dict[str, float] = dict.fromkeys(COUNTED, 0.0)
        self.pid: int | None = None
        self.current: dict[str, float] = dict.fromkeys(COUNTED, 0.0)

    def update(self, pid: int | None, figures: Mapping[str, int | float]) -> dict[str, float]:
        """The node's totals after a poll that found daemon `pid` with `figures`."""
        now = {key: float(figures.get(key) or 0) for key in COUNTED}
        restarted = pid != self.pid or any(now[k] < self.current[k] for k in COUNTED)
        if restarted:  # (the first poll adds the zeros `current` starts with)
            for key in COUNTED:
                self.finished[key] += self.current[key]
            self.pid = pid
        self.current = now
        return self.totals()

    def totals(self) -> dict[str, float]:
        return {key: self.finished[key] + self.current[key] for key in COUNTED}


def node_line(
    node: str,
    now: Mapping[str, Any],
    before: Mapping[str, float] | None,
    seconds: float,
    totals: Mapping[str, float] | None = None,
) -> str:
    """One node's line: `now` is its stats, `totals` its counts over every daemon it had
    (Segments; None: the stats' own), `before` the totals at the last poll (None for the
    first, which shows totals only), `seconds` ago."""
    supervisor = now.get("supervisor") or {}
    if now.get("lost"):
        return f"embedd node {node[:8]}: lost, skipped ({now.get('error')})"
    head = f"embedd node {node[:8]} (pid {supervisor.get('pid')}"
    head += f", {supervisor.get('restarts', 0)} restarts)"
    if "error" in now:
        return f"{head}: no daemon answering ({now['error']})"
    figures = _model(now)
    counted = totals if totals is not None else {k: float(figures[k]) for k in COUNTED}
    busy = ((now.get("requests") or {}).get("errors") or {}).get("busy", 0)
    rate = ""
    if before is not None and seconds > 0:
        chunks = max(0.0, counted["inputs"] - before["inputs"]) / seconds
        tokens = max(0.0, counted["tokens"] - before["tokens"]) / seconds
        rate = f"{chunks:,.1f} chunks/s, {tokens:,.0f} tok/s, "
    return (
        f"{head}: {rate}{int(counted['inputs']):,} chunks done, queue "
        f"{figures['queue_inputs']:,} inputs / {figures['queue_tokens']:,} tokens, computing "
        f"{100 * figures['busy_fraction']:.0f}% of the time, {busy:,} busy answers"
    )


class DaemonProgress:
    """Logs every node daemon's line every `every` seconds (to stderr, or `log`), from a
    thread, until `stop` (or the end of a `with` block), which logs a last line per node.
    Rates are over the time `clock` says passed since the node last answered."""

    def __init__(
        self,
        nodes: StatsSource,
        *,
        every: float = 10.0,
        log: Callable[[str], None] = _stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nodes = nodes
        self.every = every
        self.log = log
        self.clock = clock
        self._stop = threading.Event()
        self._segments: dict[str, Segments] = {}
        # Each node's totals at its last answered poll, and when: a node that did not answer
        # one poll is compared with the one before, over the time since then.
        self._last: dict[str, tuple[dict[str, float], float]] = {}
        self._thread = threading.Thread(target=self._run, name="embedd-progress", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def report(self) -> None:
        """Log one line per node now."""
        now = self.clock()
        try:
            stats = self.nodes.stats()
        except Exception as exc:  # Ray raises many kinds while a node goes away
            self.log(f"embedd: node daemons' stats unavailable ({exc})")
            return
        for node, figures in stats.items():
            if "error" in figures:  # no figures now: the next answer is compared with the last
                self.log(node_line(node, figures, None, 0.0))
                continue
            segments = self._segments.setdefault(node, Segments())
            pid = (figures.get("supervisor") or {}).get("pid")
            totals = segments.update(pid, _model(figures))
            before, when = self._last.get(node, (None, now))
            self.log(node_line(node, figures, before, now - when, totals))
            self._last[node] = (totals, now)

    def _run(self) -> None:
        self.report()
        while not self._stop.wait(self.every):
            self.report()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.report()
