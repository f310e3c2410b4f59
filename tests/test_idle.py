"""Idle decisions against a fake clock: a model unloads after `keep_alive` without use, and a
socket-activated daemon exits after `idle_exit` without a connection. The daemon's parts run
for real here (the bundled model, a real socket); only the clock is fake, so that hours of
idleness take no time. tests/test_lifecycle.py and tests/test_activation.py keep one
end-to-end test of each with small real values."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from embedd.config import Config, ModelConfig
from embedd.daemon.ops import Daemon
from embedd.daemon.supervise import Supervisor
from embedd.transport.msgpack_server import Server, wire_map
from embedd.wire.messages import Limits, parse_request
from tests.conftest import BUNDLED, short_tmpdir

KEEP_ALIVE = 300.0
IDLE_EXIT = 600.0


class FakeClock:
    """Monotonic seconds that move only when the test advances them (trio's MockClock,
    without autojump)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


@asynccontextmanager
async def _daemon(
    clock: FakeClock, *, keep_alive: float = KEEP_ALIVE, idle_exit: float = IDLE_EXIT
) -> AsyncIterator[Daemon]:
    workdir = short_tmpdir()
    model = ModelConfig(name="default", path=BUNDLED, max_tokens=256, keep_alive=keep_alive)
    config = Config(socket=workdir / "embedd.sock", models={"default": model}, idle_exit=idle_exit)
    daemon = Daemon(config, asyncio.get_running_loop(), clock=clock)
    try:
        yield daemon
    finally:
        await daemon.models.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _call(daemon: Daemon, op: str, **args: Any) -> dict[str, Any]:
    request = parse_request({"id": 1, "op": op, **args}, Limits())
    return await wire_map(await daemon.handle(request), request)


def _state(daemon: Daemon) -> str:
    return daemon.models.get("default").state


def _run(scenario: Callable[[FakeClock], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario(FakeClock()))


# --- keep_alive -------------------------------------------------------------------------------


def test_a_model_idle_for_just_under_keep_alive_is_kept() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock) as daemon:
            assert (await _call(daemon, "embed", input="use it once"))["count"] == 1
            clock.advance(KEEP_ALIVE - 1)
            await daemon.models.sweep_idle()
            assert _state(daemon) == "ready"

    _run(scenario)


def test_a_model_idle_for_keep_alive_is_unloaded_and_loads_again_on_use() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock) as daemon:
            await _call(daemon, "embed", input="use it once")
            clock.advance(KEEP_ALIVE)
            await daemon.models.sweep_idle()
            assert _state(daemon) == "unloaded"
            assert daemon.models.get("default").unloads == 1
            assert (await _call(daemon, "embed", input="and again"))["count"] == 1
            assert _state(daemon) == "ready"

    _run(scenario)


def test_an_explicit_load_restarts_the_idle_clock() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock) as daemon:
            await _call(daemon, "embed", input="use it once")
            clock.advance(KEEP_ALIVE - 1)
            assert (await _call(daemon, "load"))["state"] == "ready"
            clock.advance(KEEP_ALIVE - 1)  # past keep_alive since the use, not since the load
            await daemon.models.sweep_idle()
            assert _state(daemon) == "ready"
            clock.advance(1)
            await daemon.models.sweep_idle()
            assert _state(daemon) == "unloaded"

    _run(scenario)


def test_a_model_with_a_job_in_hand_is_never_unloaded_and_its_end_counts_as_a_use() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock) as daemon:
            await _call(daemon, "load")
            slot = daemon.models.get("default")
            texts = [f"sentence number {i} of a long request" for i in range(400)]
            job = asyncio.create_task(_call(daemon, "embed", input=texts))
            while slot.active_jobs == 0:
                await asyncio.sleep(0)
            clock.advance(100 * KEEP_ALIVE)
            await daemon.models.sweep_idle()  # runs at once: the job is still in hand
            assert _state(daemon) == "ready"
            assert (await job)["count"] == 400
            await daemon.models.sweep_idle()  # idle for no time since the job ended
            assert _state(daemon) == "ready"
            clock.advance(KEEP_ALIVE)
            await daemon.models.sweep_idle()
            assert _state(daemon) == "unloaded"

    _run(scenario)


def test_keep_alive_zero_keeps_a_model_loaded_forever() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock, keep_alive=0) as daemon:
            await _call(daemon, "load")
            clock.advance(365 * 86400.0)
            await daemon.models.sweep_idle()
            assert _state(daemon) == "ready"

    _run(scenario)


def test_a_model_never_loaded_is_left_alone_by_the_sweep() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock) as daemon:
            clock.advance(10 * KEEP_ALIVE)
            await daemon.models.sweep_idle()
            slot = daemon.models.get("default")
            assert (slot.state, slot.unloads) == ("unloaded", 0)

    _run(scenario)


# --- idle_exit --------------------------------------------------------------------------------


@asynccontextmanager
async def _supervised(clock: FakeClock) -> AsyncIterator[tuple[Supervisor, Server, Path]]:
    async with _daemon(clock) as daemon:
        server = Server(daemon.config, daemon, clock=clock)
        await server.start()
        try:
            yield Supervisor(daemon, server, clock=clock), server, daemon.config.socket
        finally:
            await server.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Lets the event loop run until `condition` holds (the server saw a connection come or
    go); bounded in real time only as a guard against a hang."""
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0.005)


def test_idle_exit_is_due_only_after_idle_exit_seconds_without_a_connection() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _supervised(clock) as (supervisor, _, _):
            clock.advance(IDLE_EXIT - 1)
            assert not supervisor.idle_exit_due(clock())
            clock.advance(1)
            assert supervisor.idle_exit_due(clock())

    _run(scenario)


def test_an_open_connection_keeps_the_daemon_however_long_it_is_quiet() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _supervised(clock) as (supervisor, server, socket):
            _, writer = await asyncio.open_unix_connection(str(socket))
            await _until(lambda: bool(server.open))
            clock.advance(100 * IDLE_EXIT)
            assert not supervisor.idle_exit_due(clock())
            writer.close()
            await writer.wait_closed()

    _run(scenario)


def test_the_idle_exit_clock_starts_when_the_last_connection_closes() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _supervised(clock) as (supervisor, server, socket):
            _, writer = await asyncio.open_unix_connection(str(socket))
            await _until(lambda: bool(server.open))
            clock.advance(100 * IDLE_EXIT)
            writer.close()
            await writer.wait_closed()
            await _until(lambda: not server.open)
            clock.advance(IDLE_EXIT - 1)
            assert not supervisor.idle_exit_due(clock())
            clock.advance(1)
            assert supervisor.idle_exit_due(clock())

    _run(scenario)


def test_idle_exit_zero_never_exits() -> None:
    async def scenario(clock: FakeClock) -> None:
        async with _daemon(clock, idle_exit=0) as daemon:
            server = Server(daemon.config, daemon, clock=clock)
            supervisor = Supervisor(daemon, server, clock=clock)
            clock.advance(365 * 86400.0)
            assert not supervisor.idle_exit_due(clock())

    _run(scenario)
