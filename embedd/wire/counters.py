"""The daemon's own counters, shared by the transport (which counts) and `stats` (which reports).

Plain data, no I/O: the conversation objects count answers into one `Tally` and the server
counts connections into one `ConnectionCounts`, both created by the composition root.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .errors import EmbeddError


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
