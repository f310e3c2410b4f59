"""sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET` per message.

The daemon tells systemd (`Type=notify`) when it is ready (`READY=1`), what it is doing
(`STATUS=...`), that it is stopping (`STOPPING=1`), and that its event loop is alive
(`WATCHDOG=1`). The watchdog pings are sent by a task on the event loop itself, so a wedged
loop stops them and systemd restarts the daemon after `WatchdogSec=`.

Nothing here raises: a missing or broken notification socket must never stop the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

_log = logging.getLogger("embedd.notify")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):  # the abstract namespace (Linux)
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:..., which this daemon has no use for


class Notifier:
    """Sends notifications to systemd; does nothing when not started with `Type=notify`."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            _log.warning("NOTIFY_SOCKET=%r is not a Unix socket address; not notifying", raw)
        self._sock: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines as one datagram; returns whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(message, self.address)
        except OSError as exc:
            _log.debug("sd_notify %r failed: %s", message, exc)
            return False
        return True

    def status(self, text: str) -> bool:
        # STATUS= is a single line.
        return self.send("STATUS=" + " ".join(text.split()))

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    async def watchdog(self) -> None:
        """Ping every half of `WATCHDOG_USEC` until cancelled (returns at once if not asked)."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        _log.debug("sending WATCHDOG=1 every %.3f s", interval)
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of `WATCHDOG_USEC` in seconds, if the watchdog is meant for this process."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    try:
        if not usec or int(usec) <= 0:
            return None
        if pid and int(pid) != os.getpid():
            return None
        return int(usec) / 2 / 1_000_000
    except ValueError:
        _log.warning("WATCHDOG_USEC=%r / WATCHDOG_PID=%r are not numbers; no watchdog", usec, pid)
        return None
