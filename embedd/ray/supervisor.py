"""A node's daemon as its Ray actor keeps it: `DaemonSupervisor` runs `embedd serve` on a
private socket and starts it again whenever it exits; `AttachedDaemon` uses one the node already
runs (an OS service). Both answer the same three questions: which socket now (`wait`), what to
do when a client could not reach the daemon with that pid (`replace`), and its `stats`.

No Ray here: the actor in embedd/ray/nodes.py wraps one of these, and the tests drive them
directly with a real daemon.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import embedd_client

# Seconds a daemon may take from its start to answering `hello` (importing llama.cpp and
# binding the socket: about a second here; models load on first use, not before `hello`).
START_TIMEOUT = 120.0
# Daemon starts in a row that exit before answering: then the config or the install is wrong,
# and starting it forever would hide that. The failure, with the daemon's log, goes to callers.
MAX_FAILED_STARTS = 3
# Seconds between `hello` polls while a daemon starts.
POLL_INTERVAL = 0.05
# Seconds a `hello` may take before a daemon that a client could not reach is judged hung.
HELLO_TIMEOUT = 10.0
# Seconds `stop` gives the daemon to drain after SIGTERM before SIGKILL.
STOP_GRACE = 30.0
# The tail of the daemon's log quoted when it cannot start (bytes).
LOG_TAIL = 4000
# The private directories' name prefix, and the file in each naming the process that owns it
# ("PID START": its pid and start time in clock ticks since boot, /proc/PID/stat's 22nd field,
# so that a reused pid is not taken for the owner).
DIR_PREFIX = "embedd-ray-"
OWNER_FILE = "owner"

# The daemon runs through this, so that it gets SIGTERM when the actor's process dies (Linux's
# PR_SET_PDEATHSIG, which execve keeps): a crashed or killed actor leaves no daemon behind, and
# the actor Ray starts again finds the private socket free. The signal follows the thread that
# started the child, so only the supervisor's own thread, which lives as long as it, starts one.
_TIED_TO_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except AttributeError:
    pass  # no prctl (macOS): the daemon outlives a crashed actor until `stop`
if os.getppid() != parent:  # the parent died before the signal was armed
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "embedd", *sys.argv[2:]])
"""


def start_time(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot), or None if there is none (or no
    /proc to ask)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count after it.
    return int(stat.rpartition(")")[2].split()[19])


def owner_line(pid: int) -> str:
    return f"{pid} {start_time(pid)}"


def owner_gone(line: str, started: Callable[[int], int | None] = start_time) -> bool:
    """Whether the process an owner file names (`owner_line`) has exited: no process has its
    pid now, or the one that has started at another time. A line that is not an owner's
    (a directory being made) is not judged gone."""
    try:
        pid_text, when = line.split()
        pid = int(pid_text)
    except ValueError:
        return False
    return str(started(pid)) != when


def sweep_stale(root: str | Path | None = None) -> list[Path]:
    """Remove the private directories under `root` (the temp directory) whose owning process
    has exited without removing its own: an actor killed with its node or its driver (SIGKILL
    runs no cleanup). The ones removed. Directories of live processes, of other users (not
    ours to remove), or without an owner file yet are left."""
    removed: list[Path] = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        try:
            line = (path / OWNER_FILE).read_text()
        except OSError:
            continue
        if owner_gone(line):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


class DaemonStartError(RuntimeError):
    """The node's daemon cannot be started (or reached): the message says why, with its log."""


class NodeDaemon(Protocol):
    """What the node's actor does for the steps and the driver."""

    def wait(self, timeout: float = START_TIMEOUT) -> tuple[str, int]: ...

    def replace(self, pid: int, timeout: float = START_TIMEOUT) -> tuple[str, int]: ...

    def stats(self) -> dict[str, Any]: ...

    def stop(self) -> None: ...


def _hello_pid(socket: Path, timeout: float, trust_uids: tuple[int | str, ...] = ()) -> int | None:
    """The pid of the daemon answering on `socket`, or None if none answers."""
    try:
        with embedd_client.Client(socket, timeout=timeout, trust_uids=trust_uids) as client:
            return int(client.hello()["pid"])
    except (embedd_client.EmbeddError, OSError):
        return None


class DaemonSupervisor:
    """Runs `embedd serve --socket PRIVATE --config CONFIG` and starts it again whenever it
    exits (killed, crashed, out of memory), from one thread of its own. `config` is the
    daemon's config file as TOML text (paths in it absolute: the file is written to a private
    directory); None serves the bundled model with the defaults."""

    def __init__(self, config: str | None = None, *, start_timeout: float = START_TIMEOUT):
        sweep_stale()  # what actors killed before their cleanup left on this node
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
        (self.dir / OWNER_FILE).write_text(owner_line(os.getpid()))
        self.socket = self.dir / "embedd.sock"
        self.config = self.dir / "config.toml"
        self.config.write_text(config or "")
        self.log = self.dir / "daemon.log"
        self.start_timeout = start_timeout
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None  # of the daemon now serving; None while none does
        self._starts = 0
        self._failure: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._supervise, name="embedd-supervisor")
        self._thread.daemon = True
        self._thread.start()

    # -- the supervising thread --------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = ["serve", "--socket", str(self.socket), "--config", str(self.config)]
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-c", _TIED_TO_PARENT, str(os.getpid()), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _serving(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether `proc` came to answer `hello` on the socket (False: it exited, or hung)."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and proc.poll() is None and not self._stopping:
            if _hello_pid(self.socket, HELLO_TIMEOUT) == proc.pid:
                return True
            time.sleep(POLL_INTERVAL)
        return False

    def _supervise(self) -> None:
        failed = 0
        while True:
            with self._cond:
                if self._stopping:
                    return
                proc = self._proc = self._spawn()
                self._starts += 1
            if self._serving(proc):
                failed = 0
                with self._cond:
                    self._pid = proc.pid
                    self._cond.notify_all()
            else:
                failed += 1
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()
            with self._cond:
                self._pid = None
                if failed >= MAX_FAILED_STARTS and not self._stopping:
                    self._failure = (
                        f"the embedd daemon on this node exited {failed} times before serving "
                        f"(status {proc.returncode}); its log ({self.log}) ends:\n"
                        f"{self._log_tail()}"
                    )
                self._cond.notify_all()
                if self._failure is not None:
                    return

    def _log_tail(self) -> str:
        try:
            data = self.log.read_bytes()
        except OSError as exc:
            return f"(unreadable: {exc})"
        return data[-LOG_TAIL:].decode("utf-8", "replace")

    # -- what callers ask --------------------------------------------------------------------

    @property
    def restarts(self) -> int:
        """Daemons started after the first: each one replaced a daemon that had exited."""
        with self._cond:
            return max(0, self._starts - 1)

    def wait(self, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        """The socket and pid of the daemon serving now, once one does."""
        return self._wait_for(lambda _: True, timeout)

    def _wait_for(self, acceptable: Callable[[int], bool], timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._failure is not None:
                    raise DaemonStartError(self._failure)
                if self._stopping:
                    raise DaemonStartError("the node's daemon was stopped")
                if self._pid is not None and acceptable(self._pid):
                    return str(self.socket), self._pid
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DaemonStartError(
                        f"no embedd daemon served on this node within {timeout:g}s; its log "
                        f"({self.log}) ends:\n{self._log_tail()}"
                    )
                self._cond.wait(left)

    def replace(self, pid: int, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        """A client could not reach the daemon `pid`: if that daemon is still the current one
        and does not answer `hello` either, it is killed (the thread starts the next); then
        the socket and pid of a daemon that serves. Many clients may ask after one death:
        only the first finds `pid` current, the others get its successor."""
        with self._cond:
            proc = self._proc if self._pid == pid else None
        if proc is not None:
            if _hello_pid(self.socket, HELLO_TIMEOUT) == pid:
                return str(self.socket), pid  # it answers: the client's trouble was its own
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return self._wait_for(lambda now: now != pid, timeout)

    def stats(self) -> dict[str, Any]:
        """The daemon's `stats`, and `supervisor`: its pid, socket and restarts (`error`
        instead of the daemon's figures while none serves)."""
        with self._cond:
            pid = self._pid
        out: dict[str, Any] = {}
        if pid is not None:
            try:
                with embedd_client.Client(self.socket, timeout=HELLO_TIMEOUT) as client:
                    out = client.stats()
            except embedd_client.EmbeddError as exc:
                out = {"error": str(exc)}
        else:
            out = {"error": self._failure or "the daemon is starting"}
        out["supervisor"] = {"pid": pid, "socket": str(self.socket), "restarts": self.restarts}
        return out

    def stop(self) -> None:
        """SIGTERM the daemon (it answers what it accepted, then exits), SIGKILL after
        STOP_GRACE, and remove the private directory (whatever went wrong before)."""
        with self._cond:
            self._stopping = True
            proc = self._proc
            self._cond.notify_all()
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self._thread.join(STOP_GRACE)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class AttachedDaemon:
    """The daemon the node already runs at `socket` (a systemd or launchd service, which
    restarts it itself): nothing is started; `replace` waits for it to answer again."""

    def __init__(self, socket: str, trust_uids: tuple[int | str, ...] = ()) -> None:
        self.socket = Path(socket)
        self.trust_uids = trust_uids

    def wait(self, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while True:
            pid = _hello_pid(self.socket, HELLO_TIMEOUT, self.trust_uids)
            if pid is not None:
                return str(self.socket), pid
            if time.monotonic() > deadline:
                raise DaemonStartError(
                    f"no embedd daemon answers at {self.socket} on this node (waited "
                    f"{timeout:g}s): start its service, or let embedd.ray run one"
                )
            time.sleep(POLL_INTERVAL)

    def replace(self, pid: int, timeout: float = START_TIMEOUT) -> tuple[str, int]:
        return self.wait(timeout)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any]
        try:
            with embedd_client.Client(
                self.socket, timeout=HELLO_TIMEOUT, trust_uids=self.trust_uids
            ) as client:
                out = client.stats()
                pid: int | None = int(client.hello()["pid"])
        except embedd_client.EmbeddError as exc:
            out, pid = {"error": str(exc)}, None
        out["supervisor"] = {"pid": pid, "socket": str(self.socket), "restarts": 0}
        return out

    def stop(self) -> None:
        """Nothing: the daemon is the node's, not this job's."""
