"""A client of the node's daemon that waits out `busy` and outlives the daemon's restarts,
within a bound after which the batch fails with the reason.

Ray Data does not retry a step whose function raises (a UDF exception fails the task, and by
default the job), so a daemon that is busy or restarting must never surface as an exception:
`busy` is waited for (`retry_after`), a lost daemon is replaced by the node's actor and the
request sent again in full. Resending is safe: an embed or chunk request has no side effect,
and the step returns only the answer that arrived, so each row still comes out once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import embedd_client

from embedd.ray.supervisor import START_TIMEOUT, NodeDaemon

T = TypeVar("T")

# The daemon refuses a request `timeout` above this (PROTOCOL.md, `hello`: max_timeout).
MAX_REQUEST_TIMEOUT = 3600.0
# Errors that mean "this daemon is going away", handled like a lost one: draining after
# SIGTERM, the supervisor then starts the next.
_GOING_AWAY = ("shutting_down",)


@dataclass(frozen=True)
class Patience:
    """How long one request (one batch) may wait for its node's daemon before its task fails:
    `seconds` in all, through `busy` answers and restarts (default half an hour: far beyond a
    restart, which takes seconds, or a full queue, which drains in minutes; a daemon that
    serves nothing for that long needs a person), and at most `restarts` daemon deaths (a
    batch during which the daemon died that often is likely what kills it)."""

    seconds: float = 1800.0
    restarts: int = 3


DEFAULT_PATIENCE = Patience()


class GaveUp(RuntimeError):
    """A batch could not be done within its `Patience`: the message says what was tried, how
    often, and the last error."""


class PatientClient:
    """One connection to the node's daemon (`daemon`: the node actor, or a supervisor in the
    tests; `trust_uids`: another user's daemon to trust, as for `Client`), kept across its
    restarts. `busy_answers` and `replacements` count what was waited
    out, for logs and tests."""

    def __init__(
        self,
        daemon: NodeDaemon,
        patience: Patience = DEFAULT_PATIENCE,
        trust_uids: tuple[int | str, ...] = (),
    ) -> None:
        self.daemon = daemon
        self.patience = patience
        self.trust_uids = trust_uids
        self.socket, self.pid = daemon.wait(START_TIMEOUT)
        self.client = self._connect()
        self.busy_answers = 0
        self.replacements = 0

    def close(self) -> None:
        self.client.close()

    def run(self, what: str, call: Callable[[embedd_client.Client, float], T]) -> T:
        """`call(client, seconds_left)`, again after `busy` (once `retry_after` has passed)
        and after the daemon was lost (on its replacement), until it returns; GaveUp past
        the patience. A `busy` without `retry_after` (a request larger than one client's
        share of the queue: it can never be taken) is raised for the caller to split."""
        deadline = time.monotonic() + self.patience.seconds
        deaths = 0
        last: embedd_client.EmbeddError | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GaveUp(
                    f"{what}: not done within {self.patience.seconds:g}s of waiting for the "
                    f"node's daemon ({self.busy_answers} busy answers, {deaths} restarts "
                    f"for this request); the last error: {last}"
                )
            self.client.timeout = left
            try:
                return call(self.client, min(left, MAX_REQUEST_TIMEOUT))
            except embedd_client.BusyError as exc:
                if exc.retry_after is None:
                    raise
                last = exc
                self.busy_answers += 1
                time.sleep(max(0.0, min(exc.retry_after, deadline - time.monotonic())))
            except embedd_client.EmbeddError as exc:
                if not isinstance(exc, embedd_client.DaemonUnavailableError) and (
                    exc.code not in _GOING_AWAY
                ):
                    raise
                last = exc
                deaths += 1
                if deaths > self.patience.restarts:
                    raise GaveUp(
                        f"{what}: the node's daemon was lost {deaths} times during this one "
                        f"request (limit {self.patience.restarts}); this input may be what "
                        f"kills it. The last error: {exc}"
                    ) from exc
                self._replace(max(left, 1.0))

    def _replace(self, timeout: float) -> None:
        self.client.close()
        self.socket, self.pid = self.daemon.replace(self.pid, min(timeout, START_TIMEOUT))
        self.replacements += 1
        self.client = self._connect()

    def _connect(self) -> embedd_client.Client:
        return embedd_client.Client(
            self.socket, timeout=self.patience.seconds, trust_uids=self.trust_uids
        )
