"""The daemon's own counters, shared by the transport (which counts) and `stats` (which reports).

Plain data, no I/O: the listener hands `Tally.count` to each conversation, which reports every
answer's outcome to it, and counts connections into one `ConnectionCounts`; the composition root
creates both.
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
        self.total += 1
        if error is None:
            self.ok += 1
        else:
            self.errors[str(error.code)] += 1


@dataclass
class ConnectionCounts:
    open: int = 0
    total: int = 0
    refused: int = 0
    # Closed by the daemon for saying nothing (idle_timeout) or stalling mid-frame.
    timed_out: int = 0
