"""The shell's connection deadlines against a fake timer: `frame_timeout` runs from a frame's
first byte whatever trickles in after it, and `idle_timeout` closes a connection with nothing in
flight. Both listeners run for real here (real sockets, the real shell and conversations); only
the timer the shell measures deadlines by is fake, so that no test waits for one to pass.
tests/test_hostile.py keeps an end-to-end test of each against the daemon with small real
values."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from embedd.config import Config
from embedd.http.server import HttpServer
from embedd.transport.counters import ConnectionCounts
from embedd.transport.msgpack_server import Server
from embedd.transport.shell import Listener, Timer
from embedd.wire.answers import Answer, Sizing, StatsAnswer
from embedd.wire.messages import Request
from tests.conftest import short_tmpdir

IDLE_TIMEOUT = 2.0
FRAME_TIMEOUT = 1.0
# What each listener is sent: the start of a frame, then one more byte of it at a time.
FIRST_AND_DRIP = {
    "http": (b"POST /api/embed HTTP/1.1\r\n", b"X"),
    "msgpack": (b"\x00\x00\x10\x00", b"\x00"),
}


class FakeTimer(Timer):
    """Deadlines that pass only when the test advances the time (trio's MockClock, without
    autojump). Each wait the shell starts is reported, so that a test knows the shell has taken
    what it was sent and is waiting again."""

    def __init__(self) -> None:
        self.time = 0.0
        self._waits: list[tuple[float | None, asyncio.Timeout]] = []
        self._started: asyncio.Queue[float | None] = asyncio.Queue()

    def now(self) -> float:
        return self.time

    def deadline(self, when: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        return self._wait(when)

    @contextlib.asynccontextmanager
    async def _wait(self, when: float | None) -> AsyncIterator[object]:
        async with asyncio.timeout(None) as timeout:
            entry = (when, timeout)
            self._waits.append(entry)
            self._started.put_nowait(when)
            try:
                self._fire_if_due(entry)
                yield timeout
            finally:
                self._waits.remove(entry)

    def _fire_if_due(self, entry: tuple[float | None, asyncio.Timeout]) -> None:
        when, timeout = entry
        if when is not None and when <= self.time:
            timeout.reschedule(asyncio.get_running_loop().time())

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.time += seconds
        for entry in list(self._waits):
            self._fire_if_due(entry)

    async def next_wait(self) -> float | None:
        """The deadline of the next wait the shell starts."""
        return await self._started.get()


class _NoWork:
    """A daemon that is never asked for anything: no frame in these tests arrives whole."""

    draining = False

    async def handle(
        self,
        req: Request,
        owner: object = None,
        *,
        sizing: Sizing | None = None,
        reserve: Callable[[int], Awaitable[None]] | None = None,
    ) -> Answer:
        raise AssertionError(f"no request should arrive: {req}")

    def answer_size(self, req: Request) -> int:
        return 0

    def http_long(self, model: str) -> str:
        return "error"


def _no_stats() -> StatsAnswer:
    raise AssertionError("no stats should be asked for")


@contextlib.asynccontextmanager
async def _listening(which: str, timer: FakeTimer) -> AsyncIterator[tuple[Path, Listener]]:
    workdir = short_tmpdir()
    config = Config(
        socket=workdir / "embedd.sock",
        models={},
        http_socket=workdir / "http.sock",
        idle_timeout=IDLE_TIMEOUT,
        frame_timeout=FRAME_TIMEOUT,
    )
    listener: Server | HttpServer
    if which == "http":
        listener = HttpServer(config, _NoWork(), _no_stats, ConnectionCounts(), timer=timer)
        path = workdir / "http.sock"
    else:
        listener = Server(config, _NoWork(), timer=timer)
        path = workdir / "embedd.sock"
    await listener.start()
    try:
        yield path, listener
    finally:
        await listener.stop_accepting()
        await listener.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(scenario: Callable[[FakeTimer], Coroutine[Any, Any, None]]) -> None:
    async def main() -> None:
        await scenario(FakeTimer())

    asyncio.run(main())


@pytest.mark.parametrize("which", ["http", "msgpack"])
def test_a_frame_trickled_a_byte_at_a_time_is_cut_off_frame_timeout_after_its_first_byte(
    which: str,
) -> None:
    first, drip = FIRST_AND_DRIP[which]

    async def scenario(timer: FakeTimer) -> None:
        async with _listening(which, timer) as (path, listener):
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert await timer.next_wait() == IDLE_TIMEOUT  # connected, nothing sent yet
            writer.write(first)
            assert await timer.next_wait() == FRAME_TIMEOUT
            # A byte every 0.25 s, each well within frame_timeout of the one before: the
            # deadline stays where the frame's first byte put it.
            for _ in range(3):
                timer.advance(0.25)
                writer.write(drip)
                assert await timer.next_wait() == FRAME_TIMEOUT
            assert listener.connections.timed_out == 0
            timer.advance(0.25)
            answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 408") if which == "http" else answer == b""
            assert listener.connections.timed_out == 1
            writer.close()

    _run(scenario)


@pytest.mark.parametrize("which", ["http", "msgpack"])
def test_a_connection_with_nothing_in_flight_is_closed_after_idle_timeout(which: str) -> None:
    async def scenario(timer: FakeTimer) -> None:
        async with _listening(which, timer) as (path, listener):
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert await timer.next_wait() == IDLE_TIMEOUT
            timer.advance(IDLE_TIMEOUT - 0.01)
            assert listener.connections.timed_out == 0
            timer.advance(0.01)
            assert await reader.read() == b""
            assert listener.connections.timed_out == 1
            writer.close()

    _run(scenario)
