"""The node daemons' view of a running job, logged beside Ray Data's progress.

Ray's progress counts rows and blocks; a daemon's `stats` says what the nodes are doing:
chunks and tokens per second, what is queued, how much of the time the model computed, `busy`
answers given, and restarts. A thread in the driver polls every node's actor and logs one line
per node every `every` seconds, and a last line when it stops.
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


def node_line(
    node: str, now: Mapping[str, Any], before: Mapping[str, Any] | None, seconds: float
) -> str:
    """One node's line: rates over the `seconds` since the stats `before` (the last poll; None
    for the first, which shows totals only)."""
    supervisor = now.get("supervisor") or {}
    head = f"embedd node {node[:8]} (pid {supervisor.get('pid')}"
    head += f", {supervisor.get('restarts', 0)} restarts)"
    if "error" in now:
        return f"{head}: no daemon answering ({now['error']})"
    figures = _model(now)
    busy = ((now.get("requests") or {}).get("errors") or {}).get("busy", 0)
    rate = ""
    if before is not None and "error" not in before and seconds > 0:
        old = _model(before)
        chunks = (figures["inputs"] - old["inputs"]) / seconds
        tokens = (figures["tokens"] - old["tokens"]) / seconds
        rate = f"{chunks:,.1f} chunks/s, {tokens:,.0f} tok/s, "
    return (
        f"{head}: {rate}{figures['inputs']:,} chunks done, queue {figures['queue_inputs']:,} "
        f"inputs / {figures['queue_tokens']:,} tokens, computing "
        f"{100 * figures['busy_fraction']:.0f}% of the time, {busy:,} busy answers"
    )


class DaemonProgress:
    """Logs every node daemon's line every `every` seconds (to stderr, or `log`), from a
    thread, until `stop` (or the end of a `with` block), which logs a last line per node."""

    def __init__(
        self,
        nodes: StatsSource,
        *,
        every: float = 10.0,
        log: Callable[[str], None] = _stderr,
    ) -> None:
        self.nodes = nodes
        self.every = every
        self.log = log
        self._stop = threading.Event()
        self._before: dict[str, dict[str, Any]] = {}
        self._when = time.monotonic()
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
        now = time.monotonic()
        try:
            stats = self.nodes.stats()
        except Exception as exc:  # Ray raises many kinds while a node goes away
            self.log(f"embedd: node daemons' stats unavailable ({exc})")
            return
        for node, figures in stats.items():
            self.log(node_line(node, figures, self._before.get(node), now - self._when))
        self._before, self._when = stats, now

    def _run(self) -> None:
        self.report()
        while not self._stop.wait(self.every):
            self.report()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self.report()
