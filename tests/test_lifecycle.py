"""The daemon's life: start, refuse a second instance, replace a stale socket, drain on signals,
private socket permissions, models loading, unloading and idling out."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

from embedd.daemon.app import FORCED_EXIT
from tests.conftest import Daemon, Reference, start_daemon, until_draining, wait_until_serving
from tests.wire import RawConnection


def test_sigterm_answers_every_request_in_flight_then_removes_the_socket(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    # A grace longer than the test: what is in flight is answered once the model continues.
    d = start_daemon(workdir, "shutdown_grace = 600\n")
    own_daemon.append(d)
    d.call("load")
    conns = [d.connect() for _ in range(3)]
    sent: list[tuple[RawConnection, int, int]] = []
    with d.model_stopped():
        for k, conn in enumerate(conns):
            for j in range(4):
                texts = reference.chunks[k * 12 + j * 3 : k * 12 + j * 3 + 3]
                sent.append((conn, conn.request("embed", input=texts), len(texts)))
        d.wait_for(lambda s: s["requests"] >= len(sent), "every request taken by the model thread")
        d.proc.send_signal(signal.SIGTERM)
        until_draining(conns[0])
    for conn, rid, n in sent:
        r = conn.recv_for(rid)
        assert r["ok"], r
        assert r["count"] == n
    assert d.proc.wait(60) == 0
    assert not d.socket.exists()
    assert "stopped" in d.log()


def test_sigint_drains_and_exits_0_too(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)
    with d.connect() as conn:
        rid = conn.request("embed", input=["a", "b"])
        d.proc.send_signal(signal.SIGINT)
        assert conn.recv_for(rid)["ok"]
    assert d.proc.wait(60) == 0
    assert not d.socket.exists()


def test_a_second_signal_while_draining_exits_at_once_with_status_1(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    # A long grace and work that would fill it: only the second signal ends the wait.
    d = start_daemon(workdir, "shutdown_grace = 600\n")
    own_daemon.append(d)
    conn = d.connect()
    conn.send({"op": "chunk", "id": 1, "input": "word " * 12_000_000})
    d.wait_for(lambda s: s["chunking_inputs"] > 0, "the chunking under way")
    d.proc.send_signal(signal.SIGTERM)
    _wait_for_log(d, "shutdown: waiting for answers")
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=30) == FORCED_EXIT == 1
    assert "SIGTERM again while shutting down: exiting at once (status 1)" in d.log()


def _wait_for_log(d: Daemon, line: str, timeout: float = 60.0) -> None:
    """Wait until the daemon logs `line` (its own account of where it is, never a guess)."""
    deadline = time.monotonic() + timeout
    while line not in d.log():
        assert d.proc.poll() is None, d.log()
        assert time.monotonic() < deadline, f"never logged {line!r}:\n{d.log()}"
        time.sleep(0.05)


def test_no_new_connections_are_accepted_while_draining(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    # A grace longer than the test: what is in flight is answered once the model continues.
    d = start_daemon(workdir, "shutdown_grace = 600\n")
    own_daemon.append(d)
    d.call("load")
    conn = d.connect()
    with d.model_stopped():
        rid = conn.request("embed", input=["in flight", "at the signal"])
        d.wait_for(lambda s: s["requests"] >= 1, "the request taken by the model thread")
        d.proc.send_signal(signal.SIGTERM)
        until_draining(conn)  # which starts after the listener is closed
        try:
            late = RawConnection(d.socket, timeout=5)
        except (FileNotFoundError, ConnectionRefusedError):
            pass  # the listening socket is already closed: refused at the door
        else:
            with late:
                late.request("embed", input="late")
                answer = late.recv()  # the refusal at the door (id nil) or of the request
                assert answer["ok"] is False
                assert answer["error"]["code"] == "shutting_down"
    with conn:
        assert conn.recv_for(rid)["ok"]
    assert d.proc.wait(60) == 0


def test_second_daemon_on_the_same_socket_exits_nonzero_with_a_clear_message(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    first = start_daemon(workdir)
    own_daemon.append(first)
    second = start_daemon(workdir, wait=False)
    own_daemon.append(second)
    assert second.proc.wait(30) != 0
    assert "already serving" in second.log()
    assert first.call("hello")["ok"]  # the first one is untouched


def test_stale_socket_file_is_replaced(workdir: Path, own_daemon: list[Daemon]) -> None:
    sock_path = workdir / "run" / "embedd.sock"
    sock_path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays; nobody listens on it
    assert sock_path.exists()
    d = start_daemon(workdir)
    own_daemon.append(d)
    assert d.call("hello")["ok"]
    assert "stale socket" in d.log()


def test_a_regular_file_at_the_socket_path_is_refused_not_deleted(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    path = workdir / "run" / "embedd.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("precious")
    d = start_daemon(workdir, wait=False)
    own_daemon.append(d)
    assert d.proc.wait(30) != 0
    assert "not a socket" in d.log()
    assert path.read_text() == "precious"


def test_socket_is_0600_in_a_0700_directory_whatever_the_umask(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir, umask=0o000)
    own_daemon.append(d)
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.socket.parent).st_mode) == 0o700


def test_embedd_socket_environment_variable_names_the_socket(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    path = workdir / "envsock" / "e.sock"
    d = start_daemon(workdir, socket=path, pass_socket=False, env={"EMBEDD_SOCKET": str(path)})
    own_daemon.append(d)
    assert path.exists() and d.call("hello")["ok"]


def test_requests_that_arrive_while_the_model_loads_wait_for_it(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)
    with d.connect() as conn:
        ids = [conn.request("embed", input=f"text number {i}") for i in range(10)]
        assert all(conn.recv_for(rid)["ok"] for rid in ids)
    assert d.log().count("loading model default") == 1


def test_idle_model_unloads_itself_after_keep_alive(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    cfg = '[models.default]\npath = "{bundled}"\nmax_tokens = 256\nkeep_alive = 1\n'
    d = start_daemon(workdir, cfg)
    own_daemon.append(d)
    assert d.call("embed", input="wake up")["ok"]
    deadline = time.monotonic() + 20
    state = "ready"
    while time.monotonic() < deadline and state != "unloaded":
        time.sleep(0.2)
        state = d.call("models")["models"][0]["state"]
    assert state == "unloaded"
    assert d.call("embed", input="and again")["ok"]  # loads on next use


def test_client_going_away_cancels_its_queued_inputs(
    workdir: Path, own_daemon: list[Daemon], reference: Reference
) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)
    conn = RawConnection(d.socket)
    conn.request("embed", input=reference.chunks[:400])
    d.wait_until_computing({"requests": 0})  # its inputs are queued in the model thread
    conn.close()
    stats = d.wait_for(lambda s: s["cancelled"] > 0, "the closed client's inputs cancelled")
    assert stats["inputs"] + stats["cancelled"] <= 400
    assert stats["inputs"] < 400
    assert d.call("embed", input="still serving")["ok"]


def test_logs_are_one_line_per_event_with_level_and_llama_log_only_when_verbose(
    workdir: Path, own_daemon: list[Daemon]
) -> None:
    quiet = start_daemon(workdir)
    own_daemon.append(quiet)
    quiet.call("load")
    quiet.stop()
    assert " INFO embedd.app: " in quiet.log()
    assert "embedd.llama" not in quiet.log()
    assert "request " not in quiet.log()
    loud = start_daemon(workdir, extra_args=("--verbose",))
    own_daemon.append(loud)
    loud.call("load")
    loud.stop()
    assert " DEBUG embedd.llama: " in loud.log()
    assert " DEBUG embedd.daemon: request " in loud.log()  # --verbose logs every request


def test_python_dash_m_embedd_help_works() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "--help"], capture_output=True, text=True, check=True
    )
    assert "serve" in out.stdout


def test_wait_helper_notices_a_daemon_that_died(workdir: Path) -> None:
    # Guards the fixtures themselves: a daemon that cannot start is reported, not waited on.
    d = start_daemon(workdir, "max_frame = -1\n", wait=False)
    try:
        wait_until_serving(d, timeout=30)
    except AssertionError as exc:
        assert "max_frame" in str(exc)
    else:
        raise AssertionError("a daemon with an invalid config started")
