"""Who may connect: a real second local user against the real daemon.

The socket is made world-accessible here (as a group-accessible system socket would be for
its group), so that the peer-credential check is the only fence and its verdict is what the
test sees. Creating the user needs root: the tests skip otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack  # type: ignore[import-untyped]
import pytest

from embedd.transport.peercred import AccessPolicy, Peer
from tests.service_harness import Manager
from tests.wire import RawConnection

USER = "embedd-t-peer"
GROUP = "embedd-t-grp"

# Runs as the other user: stdlib only (its interpreter may lack msgpack). Sends `hello`,
# prints the first frame it gets back (hex) and whether the daemon closed the connection.
_CLIENT = r"""
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(bytes.fromhex("0000000e82a2696401a26f70a568656c6c6f"))
except BrokenPipeError:
    pass  # refused and closed before we sent: the answer still waits to be read
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
(n,) = struct.unpack(">I", read(4))
frame = read(n)
s.settimeout(2)
try:
    closed = s.recv(1) == b""
except ConnectionResetError:  # closed with our request unread: the kernel says reset
    closed = True
except TimeoutError:
    closed = False
print(json.dumps({"frame": frame.hex(), "closed": closed}))
"""


@dataclass(frozen=True)
class OtherUser:
    uid: int
    gid: int
    extra_gid: int  # a group the user is not a member of unless the test says so
    python: str


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _python_for(uid: int, gid: int) -> str | None:
    """An interpreter the other user can run (ours may live under /root)."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "pass"], user=uid, group=gid, capture_output=True, timeout=30
            )
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return candidate
    return None


@pytest.fixture(scope="module")
def other_user() -> Iterator[OtherUser]:
    if sys.platform != "linux":
        pytest.skip("the second-user test uses useradd and SO_PEERCRED (Linux)")
    if os.geteuid() != 0:
        pytest.skip("creating a second local user needs root (CI runs the suite as root)")
    if not shutil.which("useradd") or not shutil.which("groupadd"):
        pytest.skip("useradd/groupadd are not installed")
    import grp
    import pwd

    created_user = created_group = False
    try:
        try:
            grp.getgrnam(GROUP)
        except KeyError:
            _run("groupadd", GROUP)
            created_group = True
        try:
            pwd.getpwnam(USER)
        except KeyError:
            _run("useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", USER)
            created_user = True
        user = pwd.getpwnam(USER)
        python = _python_for(user.pw_uid, user.pw_gid)
        if python is None:
            pytest.skip(f"no Python interpreter here is executable by {USER}")
        yield OtherUser(user.pw_uid, user.pw_gid, grp.getgrnam(GROUP).gr_gid, python)
    finally:
        if created_user:
            subprocess.run(["userdel", USER], capture_output=True, timeout=60)
        if created_group:
            subprocess.run(["groupdel", GROUP], capture_output=True, timeout=60)


@pytest.fixture
def open_manager(workdir: Path) -> Iterator[Manager]:
    os.chmod(workdir, 0o755)
    m = Manager(workdir, mode=0o666, dir_mode=0o755)
    yield m
    m.close()


def _connect_as(
    user: OtherUser, path: Path, extra_groups: tuple[int, ...] = ()
) -> tuple[dict[str, object], bool]:
    out = subprocess.run(
        [user.python, "-c", _CLIENT, str(path)],
        user=user.uid,
        group=user.gid,
        extra_groups=list(extra_groups),
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    frame: dict[str, object] = msgpack.unpackb(bytes.fromhex(result["frame"]), raw=False)
    return frame, bool(result["closed"])


def test_another_user_is_refused_by_default_with_forbidden_and_a_logged_uid_and_pid(
    other_user: OtherUser, open_manager: Manager
) -> None:
    proc = open_manager.spawn()
    open_manager.expect("READY=1")
    frame, closed = _connect_as(other_user, open_manager.path)
    assert frame["id"] is None and frame["ok"] is False, frame
    error = frame["error"]
    assert isinstance(error, dict) and error["code"] == "forbidden", frame
    assert closed
    # The daemon's own user (root here) is still served, and counted the refusal.
    with RawConnection(open_manager.path) as conn:
        stats = conn.call("stats")
    assert stats["connections"]["refused"] == 1
    proc.terminate()
    assert proc.wait(30) == 0
    log = open_manager.log()
    assert f"refused a connection from uid {other_user.uid} ({USER})" in log, log
    assert "pid " in log.split("refused a connection", 1)[1].split("\n", 1)[0]


def test_allow_uids_lets_the_user_in(other_user: OtherUser, open_manager: Manager) -> None:
    proc = open_manager.spawn(config=f'allow_uids = ["{USER}"]\n')
    open_manager.expect("READY=1")
    frame, closed = _connect_as(other_user, open_manager.path)
    assert frame["ok"] is True and frame["id"] == 1, frame
    assert frame["protocol"] == 1
    assert not closed
    proc.terminate()
    assert proc.wait(30) == 0


def test_allow_gid_serves_members_of_the_group_only(
    other_user: OtherUser, open_manager: Manager
) -> None:
    proc = open_manager.spawn(config=f'allow_gid = "{GROUP}"\n')
    open_manager.expect("READY=1")
    # The group as a supplementary group of the connecting process (SO_PEERGROUPS).
    member, _ = _connect_as(other_user, open_manager.path, extra_groups=(other_user.extra_gid,))
    assert member["ok"] is True, member
    outsider, closed = _connect_as(other_user, open_manager.path)
    assert outsider["ok"] is False and closed, outsider
    proc.terminate()
    assert proc.wait(30) == 0


def test_policy_rules() -> None:
    policy = AccessPolicy(own_uid=1000, allow_uids=frozenset({1001}), allow_gid=50)
    assert policy.allows(Peer(uid=0))
    assert policy.allows(Peer(uid=1000))
    assert policy.allows(Peer(uid=1001))
    assert policy.allows(Peer(uid=1002, gid=50))
    assert policy.allows(Peer(uid=1002, gid=7, groups=(3, 50)))
    assert not policy.allows(Peer(uid=1002, gid=7, groups=(3,)))
    assert not AccessPolicy(own_uid=1000).allows(Peer(uid=1001, gid=1000, groups=(1000,)))


# --- the client's side: it checks whoever answers as the daemon checks its clients -----------

# Runs as the other user: listens on an already bound socket (its fd is argv[1]) and records
# what arrives.
_SQUATTER = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.listen(4)
print("listening", flush=True)
conn, _ = s.accept()
conn.settimeout(3)
try:
    data = conn.recv(65536)
except TimeoutError:
    data = b""
print("received", len(data), flush=True)
"""


def test_the_client_refuses_a_socket_directory_another_user_created_first(
    other_user: OtherUser, workdir: Path
) -> None:
    import embedd_client as ec

    squatted = workdir / "embedd-squatted"
    squatted.mkdir()
    os.chown(squatted, other_user.uid, other_user.gid)
    with (
        ec.Client(squatted / "embedd.sock") as client,
        pytest.raises(ec.UntrustedDaemonError) as info,
    ):
        client.embed("my private text")
    assert f"uid {other_user.uid}" in info.value.message


def test_the_client_refuses_a_daemon_running_as_another_user_and_sends_nothing(
    other_user: OtherUser, workdir: Path
) -> None:
    import socket as socketlib

    import embedd_client as ec

    path = workdir / "embedd.sock"
    bound = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    bound.bind(str(path))  # owned by us, so only the peer check can catch the impostor
    os.chmod(path, 0o666)
    os.chmod(workdir, 0o755)
    squatter = subprocess.Popen(
        [other_user.python, "-c", _SQUATTER, str(bound.fileno())],
        user=other_user.uid,
        group=other_user.gid,
        pass_fds=(bound.fileno(),),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
        preexec_fn=lambda: os.dup2(bound.fileno(), 3),
    )
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline().strip() == "listening"
        with ec.Client(path) as client, pytest.raises(ec.UntrustedDaemonError) as info:
            client.embed("my private text")
        assert f"runs as uid {other_user.uid}" in info.value.message
        out, _ = squatter.communicate(timeout=30)
        assert "received 0" in out
        # Trusting that user explicitly is the way to use such a daemon.
        assert other_user.uid in ec._trusted_uids([USER])
    finally:
        squatter.kill()
        bound.close()
