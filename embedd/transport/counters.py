"""The daemon's own counters, shared by the transport (which counts) and `stats` (which reports).

Plain data, no I/O: the msgpack listener hands `Tally.count` to each conversation, which reports
every answer's outcome to it, the HTTP conversation counts its answers into the same `Tally`,
and the listeners count connections into one `ConnectionCounts`; the composition root creates
both.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..wire.errors import EmbeddError


@dataclass
class Tally:
    """Requests answered, by outcome."""

    total: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def count(self, error: EmbeddError | None) -> None:
        self.count_key(None if error is None else str(error.code))

    def count_key(self, key: str | None) -> None:
        """One answer: ok (None), or an error under `key` (an embedd code, or for an HTTP
        failure that has none, such as a 401 or a 404, `http_<status>`)."""
        self.total += 1
        if key is None:
            self.ok += 1
        else:
            self.errors[key] += 1


@dataclass
class ConnectionCounts:
    open: int = 0
    total: int = 0
    refused: int = 0
    # Closed by the daemon for saying nothing (idle_timeout) or stalling mid-frame.
    timed_out: int = 0
