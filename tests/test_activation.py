"""Socket activation and sd_notify against the real daemon process: a harness plays systemd
(binds the socket, passes it as fd 3 with LISTEN_PID/LISTEN_FDS, reads NOTIFY_SOCKET)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedd.daemon.notify import Notifier
from embedd.transport import activation
from tests.service_harness import Manager
from tests.wire import RawConnection

linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="systemd socket activation and sd_notify are Linux things"
)


@pytest.fixture
def manager(workdir: Path) -> Iterator[Manager]:
    m = Manager(workdir)
    yield m
    m.close()


@linux_only
def test_serves_the_passed_socket_notifies_ready_status_watchdog_and_stopping(
    manager: Manager, workdir: Path
) -> None:
    own = workdir / "own" / "embedd.sock"
    proc = manager.spawn(
        "--preload", "default", "--socket", str(own), env={"WATCHDOG_USEC": "400000"}
    )
    ready = manager.expect("READY=1")
    # READY=1 comes with a status line, once the preloaded model is ready.
    assert "models ready: default" in ready, ready
    with RawConnection(manager.path) as conn:
        models = {m["name"]: m for m in conn.call("models")["models"]}
        assert models["default"]["state"] == "ready"
        r = conn.call("embed", input="served over the inherited socket")
        assert r["ok"] and r["count"] == 1
    # Watchdog pings every WATCHDOG_USEC / 2 = 0.2 s: no more than that in a second (a busy
    # machine can only make them later), and they keep coming.
    pings = [m for m in manager.drain(1.0) if m == "WATCHDOG=1"]
    assert len(pings) <= 7, manager.messages
    for _ in range(3):
        manager.expect("WATCHDOG=1")
    proc.send_signal(signal.SIGTERM)
    manager.expect("STOPPING=1")
    assert proc.wait(30) == 0
    log = manager.log()
    assert f"serving on {manager.path} (passed by systemd)" in log, log
    # The inherited socket stays (it is systemd's) and still takes connections; the daemon
    # never bound a socket of its own.
    assert stat.S_ISSOCK(os.lstat(manager.path).st_mode)
    assert not own.parent.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(manager.path))


@linux_only
def test_idle_exit_then_the_next_client_starts_it_again_without_an_error(
    manager: Manager,
) -> None:
    first = manager.spawn("--idle-exit", "1")
    manager.expect("READY=1")
    with RawConnection(manager.path) as conn:
        assert conn.call("hello")["ok"]
        time.sleep(1.6)  # an open connection keeps the daemon, however quiet
        assert first.poll() is None
    assert first.wait(10) == 0
    manager.expect("STOPPING=1")
    assert "no connection for 1s: exiting" in manager.log()
    # A client connects while no daemon runs: it waits in the socket's backlog, as under
    # systemd, which starts the daemon because the socket became readable.
    with RawConnection(manager.path, timeout=60) as client:
        rid = client.request("embed", input="wakes the daemon up")
        assert manager.pending_connection(5.0)
        second = manager.spawn("--idle-exit", "1")
        r = client.recv_for(rid)
        assert r["ok"] and r["count"] == 1, r
    assert second.wait(15) == 0  # and it goes idle again


@linux_only
def test_passed_fd_that_is_not_a_listening_socket_is_a_clear_error(
    manager: Manager, workdir: Path
) -> None:
    not_a_socket = os.open(workdir / "config.toml", os.O_RDONLY | os.O_CREAT)
    try:
        proc = manager.spawn(fd=not_a_socket)
        assert proc.wait(30) == 1
    finally:
        os.close(not_a_socket)
    assert "none of them a listening Unix stream socket" in manager.log()


@linux_only
def test_listen_fds_meant_for_another_process_are_ignored_and_cleared() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    assert activation.systemd_fds(env) == []
    assert env == {}  # unset, as sd_listen_fds(1) does, so children do not take them
    assert activation.systemd_fds({}) == []


@linux_only
def test_watchdog_pings_come_from_the_event_loop_and_stop_while_it_is_wedged(
    workdir: Path,
) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(workdir / "n.sock"))
    receiver.setblocking(False)

    def received() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(receiver.recv(100))
            except BlockingIOError:
                return got

    env = {"NOTIFY_SOCKET": str(workdir / "n.sock"), "WATCHDOG_USEC": "100000"}

    async def pings(count: int) -> None:
        """Lets the loop run until `count` more pings arrived (a bound, not a speed check)."""
        got = 0
        async with asyncio.timeout(30):
            while got < count:
                await asyncio.sleep(0.01)
                got += len(received())

    async def scenario() -> int:
        notifier = Notifier(env)
        assert notifier.watchdog_interval == 0.05
        task = asyncio.create_task(notifier.watchdog())
        await pings(3)
        received()  # none left unread: what arrives from here on was sent while wedged
        time.sleep(0.4)  # the loop is wedged (8 intervals): nothing may be sent meanwhile
        during = len(received())
        await pings(3)  # and the pings resume once the loop runs again
        task.cancel()
        return during

    try:
        during = asyncio.run(scenario())
    finally:
        receiver.close()
    assert during == 0


@linux_only
def test_notify_to_the_abstract_namespace_and_watchdog_for_another_pid(workdir: Path) -> None:
    name = f"embedd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send("READY=1", "STATUS=ok")
        assert receiver.recv(100) == b"READY=1\nSTATUS=ok"
        notifier.close()
    assert Notifier({}).send("READY=1") is False  # not under systemd: a no-op
    other = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert Notifier(other).watchdog_interval is None


@pytest.mark.skipif(
    sys.platform != "darwin",
    reason="launch_activate_socket lives in macOS's libSystem: the ctypes call cannot run on "
    "Linux (the plist itself is checked in test_service.py)",
)
def test_launchd_activation_outside_launchd_finds_no_socket() -> None:
    assert activation.launchd_fds() == []  # ESRCH: not started by launchd


def test_launchd_lookup_is_a_no_op_off_macos() -> None:
    if sys.platform == "darwin":
        pytest.skip("covered by the test above on macOS")
    assert activation.launchd_fds() == []
