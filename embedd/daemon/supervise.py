"""The daemon's side of the service manager's contract, once the socket is served.

- preload the configured models, then tell systemd `READY=1` (at once if nothing to preload);
- keep `STATUS=` current (models ready, queued inputs, open connections);
- ping `WATCHDOG=1` from the event loop, so that a wedged loop gets the daemon restarted;
- `STOPPING=1` when shutting down;
- exit-on-idle: under socket activation, stop after `idle_exit` seconds without a connection.
  Clients arriving after that wait in the manager's socket, which starts the daemon again.

Without `$NOTIFY_SOCKET` the notifications are no-ops; preloading and exit-on-idle still apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Protocol

from ..config import Config
from ..transport.activation import Inherited
from ..wire.errors import EmbeddError
from .notify import Notifier

_log = logging.getLogger("embedd.supervise")

_STATUS_EVERY = 2.0
# After closing the listener on idle: how long connections accepted just before may take to
# reach the server's bookkeeping (a few event-loop turns; this is ample).
_SETTLE = 0.1


@dataclass(frozen=True)
class StatusSnapshot:
    """What the service manager's STATUS= line says."""

    models_ready: tuple[str, ...]
    models_total: int
    queued_inputs: int


class Supervised(Protocol):
    """The daemon as the supervisor sees it: its settings, a status, models to preload, and
    the event that stops it."""

    @property
    def config(self) -> Config: ...
    @property
    def stop_requested(self) -> asyncio.Event: ...
    def snapshot(self) -> StatusSnapshot: ...
    async def preload(self, name: str) -> None: ...


class Listener(Protocol):
    """The msgpack listener as the supervisor sees it: where it listens, what it serves, and
    how to stop taking connections before an idle exit."""

    @property
    def address(self) -> str: ...
    @property
    def inflight(self) -> int: ...
    @property
    def open(self) -> Sized: ...
    @property
    def inherited(self) -> Inherited | None: ...
    @property
    def last_activity(self) -> float: ...
    @last_activity.setter
    def last_activity(self, value: float) -> None: ...
    async def stop_accepting(self) -> None: ...


class Supervisor:
    def __init__(
        self,
        daemon: Supervised,
        server: Listener,
        notifier: Notifier | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.daemon = daemon
        self.server = server
        self.notifier = notifier if notifier is not None else Notifier()
        # Monotonic seconds, the same clock as the server's `last_activity` (a test's fake
        # clock decides idle exit without waiting; trio's MockClock is the model).
        self.clock = clock
        self.ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for coro in (self.notifier.watchdog(), self._preload_then_ready(), self._idle_exit()):
            self._tasks.append(asyncio.create_task(coro))

    def stopping(self) -> None:
        self.notifier.send(
            "STOPPING=1", f"STATUS=stopping: finishing {self.server.inflight} requests"
        )

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.notifier.close()

    def status_text(self) -> str:
        snap = self.daemon.snapshot()
        return (
            f"serving on {self.server.address}; models ready: "
            f"{', '.join(snap.models_ready) or 'none'} (of {snap.models_total}); "
            f"queued inputs: {snap.queued_inputs}; connections: {len(self.server.open)}"
        )

    async def _preload_then_ready(self) -> None:
        config = self.daemon.config
        for name in config.preload:
            self.notifier.status(f"loading model {name}")
            started = time.monotonic()
            try:
                await self.daemon.preload(name)
            except EmbeddError as exc:
                # Still ready: other models may serve, and `models` reports the failure.
                _log.error("preloading model %s failed: %s", name, exc.message)
            else:
                _log.info("preloaded model %s in %.2fs", name, time.monotonic() - started)
        self.ready.set()
        status = self.status_text()
        self.notifier.send("READY=1", "STATUS=" + status)
        if self.notifier.enabled:
            _log.info("told the service manager we are ready")
        await self._status_loop(status)

    async def _status_loop(self, last: str) -> None:
        if not self.notifier.enabled:
            return
        while True:
            await asyncio.sleep(_STATUS_EVERY)
            text = self.status_text()
            if text != last:
                self.notifier.status(text)
                last = text

    def idle_exit_due(self, now: float) -> bool:
        """Whether a socket-activated daemon exits at `now`: no connection is open, and none
        opened or closed for `idle_exit` seconds (`idle_exit = 0`: never)."""
        idle = self.daemon.config.idle_exit
        server = self.server
        return idle > 0 and not server.open and now - server.last_activity >= idle

    async def _idle_exit(self) -> None:
        idle = self.daemon.config.idle_exit
        if idle <= 0:
            return
        server = self.server
        if server.inherited is None:
            _log.warning(
                "idle_exit is set but the socket was not passed by a service manager: ignoring "
                "it, since nothing would start the daemon again"
            )
            return
        await self.ready.wait()
        server.last_activity = max(server.last_activity, self.clock())
        while True:
            await asyncio.sleep(min(idle / 4, 1.0))
            if not self.idle_exit_due(self.clock()):
                continue
            # Clients connecting from now on queue in the manager's socket until it starts
            # the next daemon; the few accepted just before are served to their end first.
            await server.stop_accepting()
            await asyncio.sleep(_SETTLE)
            while server.open:
                await asyncio.sleep(_SETTLE)
            _log.info(
                "no connection for %gs: exiting (%s starts embedd again on the next connection)",
                idle,
                server.inherited.manager,
            )
            self.daemon.stop_requested.set()
            return
