"""Socket files, the same for every listener (msgpack and HTTP): a private directory, a socket
born 0600, a stale socket replaced only when nobody answers on it, and removal only of the
file that is still ours.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from pathlib import Path

_log = logging.getLogger("embedd.server")

# Linux sun_path is 108 bytes including the terminating NUL (macOS: 104).
_MAX_SOCKET_PATH = 107


class SocketInUseError(Exception):
    """Another daemon answers on the socket path, or the path cannot be ours."""


def _prepare_directory(directory: Path) -> None:
    """Make the socket's directory private (0700) if it is a directory of its own.

    A dedicated directory (ours, or created here) is forced to 0700 whatever the umask; an
    existing shared one (say /tmp, named with --socket) is left alone, with a warning.
    """
    uid = os.getuid()
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        return
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketInUseError(f"{directory} is not a directory")
    dedicated = directory.name == "embedd" or directory.name.startswith("embedd-")
    if dedicated and st.st_uid != uid:
        raise SocketInUseError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to us (uid {uid}); "
            "refusing to serve from a directory someone else controls"
        )
    if dedicated:
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(directory, 0o700)
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        _log.warning("socket directory %s is writable by others", directory)


def bind_unix_socket(path: Path) -> socket.socket:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise SocketInUseError(
            f"socket path is {len(os.fsencode(path))} bytes, longer than the {_MAX_SOCKET_PATH} "
            f"a Unix socket allows: {path}"
        )
    _prepare_directory(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise SocketInUseError(f"{path} exists and is not a socket; refusing to replace it")
        if _answers(path):
            raise SocketInUseError(
                f"another embedd is already serving on {path}; stop it first (embedd stop) "
                "or choose another --socket"
            )
        _log.info("removing stale socket %s (nobody answers on it)", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:  # another daemon won the race
            raise SocketInUseError(f"another embedd is already serving on {path}") from exc
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


def remove_if_ours(path: Path, inode: tuple[int, int]) -> None:
    """Remove the socket file we bound, unless another daemon has bound there since."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if inode == (st.st_dev, st.st_ino):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
