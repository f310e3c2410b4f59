"""Socket activation: take the listening socket from the service manager instead of binding one.

- systemd passes sockets as fds 3, 4, ... with `LISTEN_PID` (ours, else they are not for us),
  `LISTEN_FDS` (how many) and `LISTEN_FDNAMES` (colon-separated names), see sd_listen_fds(3).
- launchd hands them out through `launch_activate_socket(name, &fds, &count)` in libSystem,
  called here through ctypes; `name` is the key under `Sockets` in the plist.

Either way the socket belongs to the service manager: the daemon serves it but never unlinks
its path, chmods it or shuts it down, so the manager can start the daemon again on the next
connection.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
import stat
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

_log = logging.getLogger("embedd.activation")

SD_LISTEN_FDS_START = 3
# The key under `Sockets` in the LaunchAgent plist (launchd/*.plist).
LAUNCHD_SOCKET_NAME = "Listeners"

# errno values launch_activate_socket returns (macOS <sys/errno.h>).
_DARWIN_ENOENT = 2
_DARWIN_ESRCH = 3


class ActivationError(Exception):
    """The service manager passed something the daemon cannot serve."""


@dataclass
class Inherited:
    """A listening socket the service manager created and handed over."""

    sock: socket.socket
    manager: str  # "systemd" or "launchd"
    name: str  # LISTEN_FDNAMES entry, or the launchd socket name

    @property
    def address(self) -> str:
        try:
            name = self.sock.getsockname()
        except OSError:
            return f"fd {self.sock.fileno()}"
        if isinstance(name, bytes):  # abstract namespace
            return "@" + name[1:].decode(errors="replace")
        return str(name)


def systemd_fds(env: MutableMapping[str, str] | None = None) -> list[tuple[int, str]]:
    """The fds systemd passed to this process, with their names; [] if none.

    Like sd_listen_fds(unset_environment=1): the variables are removed from the environment
    so that no child process takes the fds for its own, and the fds are made close-on-exec.
    """
    env = os.environ if env is None else env
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            _log.debug("LISTEN_PID=%s is not our pid %d: ignoring LISTEN_FDS", pid, os.getpid())
            return []
        n = int(count)
    except ValueError:
        raise ActivationError(
            f"LISTEN_PID={pid!r} / LISTEN_FDS={count!r} are not numbers"
        ) from None
    if n <= 0:
        return []
    labels = names.split(":") if names else []
    fds = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        with contextlib.suppress(OSError):
            os.set_inheritable(fd, False)
        fds.append((fd, labels[i] if i < len(labels) else "unknown"))
    return fds


def launchd_fds(name: str = LAUNCHD_SOCKET_NAME) -> list[int]:
    """The fds launchd created for the plist's `Sockets` entry `name`; [] if not under launchd."""
    if sys.platform != "darwin":
        return []
    libsystem = ctypes.CDLL(ctypes.util.find_library("System") or "libSystem.dylib")
    activate = libsystem.launch_activate_socket
    activate.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.POINTER(ctypes.c_int)),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    activate.restype = ctypes.c_int
    fds_ptr = ctypes.POINTER(ctypes.c_int)()
    count = ctypes.c_size_t(0)
    err = activate(name.encode(), ctypes.byref(fds_ptr), ctypes.byref(count))
    if err in (_DARWIN_ESRCH, _DARWIN_ENOENT):
        # ESRCH: not started by launchd; ENOENT: the plist has no such socket.
        return []
    if err != 0:
        raise ActivationError(f"launch_activate_socket({name!r}) failed: {os.strerror(err)}")
    try:
        return [fds_ptr[i] for i in range(count.value)]
    finally:
        libsystem.free.argtypes = [ctypes.c_void_p]
        libsystem.free(fds_ptr)


def _listening_stream_socket(fd: int) -> socket.socket | None:
    return _stream_socket(fd, unix_only=True)


def _stream_socket(fd: int, *, unix_only: bool) -> socket.socket | None:
    """The passed fd as a listening stream socket (Unix only, unless told), else None."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    listening = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_ACCEPTCONN", 30))
    wrong_family = unix_only and sock.family != socket.AF_UNIX
    if sock.type != socket.SOCK_STREAM or wrong_family or not listening:
        sock.detach()  # not ours to close
        return None
    return sock


# The name that marks a passed socket as the HTTP front's: `FileDescriptorName=http` in a
# systemd .socket unit, or the `HTTP` key under the LaunchAgent's `Sockets`.
HTTP_SOCKET_NAME = "http"
LAUNCHD_HTTP_SOCKET_NAME = "HTTP"


@dataclass
class Passed:
    """The sockets the service manager passed: the msgpack one, and the HTTP one if any."""

    msgpack: Inherited | None = None
    http: socket.socket | None = None


def _http_socket(fd: int) -> socket.socket | None:
    """A passed stream socket for HTTP: Unix or TCP."""
    return _stream_socket(fd, unix_only=False)


def inherited_sockets(env: MutableMapping[str, str] | None = None) -> Passed:
    """Every socket the service manager passed: those named `http` serve the HTTP front, the
    first other listening Unix stream socket the msgpack protocol."""
    systemd = systemd_fds(env)
    http = None
    rest: list[tuple[int, str]] = []
    for fd, label in systemd:
        if label == HTTP_SOCKET_NAME and http is None:
            http = _http_socket(fd)
        else:
            rest.append((fd, label))
    for fd in launchd_fds(LAUNCHD_HTTP_SOCKET_NAME):
        http = http or _http_socket(fd)
    return Passed(_choose(rest, launchd_fds()), http)


def _choose(systemd: list[tuple[int, str]], launchd: list[int]) -> Inherited | None:
    found: list[Inherited] = []
    for fd, label in systemd:
        sock = _listening_stream_socket(fd)
        if sock is not None:
            found.append(Inherited(sock, "systemd", label))
    for fd in launchd:
        sock = _listening_stream_socket(fd)
        if sock is not None:
            found.append(Inherited(sock, "launchd", LAUNCHD_SOCKET_NAME))
    if not found:
        if systemd or launchd:
            raise ActivationError(
                f"the service manager passed {len(systemd) + len(launchd)} fd(s), none of them "
                "a listening Unix stream socket (check ListenStream= / SockPathName)"
            )
        return None
    for extra in found[1:]:
        _log.warning(
            "ignoring extra socket %s (%s) passed by %s", extra.address, extra.name, extra.manager
        )
        extra.sock.detach()  # left open, as the manager passed it
    chosen = found[0]
    chosen.sock.setblocking(False)
    return chosen
