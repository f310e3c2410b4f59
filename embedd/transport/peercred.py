"""Who is on the other end of a Unix socket, and whether they may use the daemon.

The socket's file mode is the first fence (0600: only the owner can connect); this is the
second, for sockets whose mode a service manager chose (a group-accessible system socket) or
that someone loosened. By default only the daemon's own uid and root are served;
`allow_uids` and `allow_gid` in the config widen that.

- Linux: `SO_PEERCRED` gives the peer's pid, uid and gid at connect time, and
  `SO_PEERGROUPS` (Linux 4.13) its supplementary groups.
- macOS: `getpeereid()` gives uid and gid, `LOCAL_PEERPID` the pid.
- Elsewhere the credentials are unknown and the check is skipped (on Windows the named pipe's
  own security descriptor restricts it to the current user, see winpipe.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass

_log = logging.getLogger("embedd.peercred")

_SO_PEERGROUPS = 59  # Linux <asm-generic/socket.h>; not exported by the socket module
_SOL_LOCAL = 0  # macOS <sys/un.h>
_LOCAL_PEERPID = 0x002
# CPython's getsockopt() takes at most 1024 bytes: 256 supplementary groups.
_MAX_GROUPS_BUF = 1024


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int | None = None
    pid: int | None = None
    # Supplementary groups as the kernel reports them; None if it cannot.
    groups: tuple[int, ...] | None = None


def peer_of(fd: int) -> Peer | None:
    """The credentials of the process connected to the Unix socket `fd`, or None if unknown."""
    sock = socket.socket(fileno=fd)
    try:
        if sys.platform == "linux":
            return _linux_peer(sock)
        if sys.platform == "darwin":
            return _darwin_peer(sock)
        return None
    finally:
        sock.detach()  # the fd stays open: it belongs to the connection


def _linux_peer(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] | None = None
    try:
        graw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_GROUPS_BUF)
        groups = struct.unpack(f"{len(graw) // 4}I", graw[: len(graw) // 4 * 4])
    except OSError as exc:  # old kernel (ENOPROTOOPT), or more groups than fit (ERANGE)
        if exc.errno not in (errno.ENOPROTOOPT, errno.ERANGE, errno.EINVAL):
            raise
    return Peer(uid=uid, gid=gid, pid=pid if pid > 0 else None, groups=groups)


def _darwin_peer(sock: socket.socket) -> Peer:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    pid: int | None = None
    with contextlib.suppress(OSError):
        pid = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID)
    return Peer(uid=uid.value, gid=gid.value, pid=pid)


def _in_group_database(uid: int, gid: int) -> bool:
    """Whether the user database puts `uid` in group `gid` (primary or supplementary)."""
    import grp
    import pwd

    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    if user.pw_gid == gid:
        return True
    try:
        return user.pw_name in grp.getgrgid(gid).gr_mem
    except KeyError:
        return False


@dataclass(frozen=True)
class AccessPolicy:
    """Root and `own_uid` always; also the uids in `allow_uids` and members of `allow_gid`."""

    own_uid: int
    allow_uids: frozenset[int] = frozenset()
    allow_gid: int | None = None

    @classmethod
    def for_daemon(
        cls, allow_uids: Iterable[int] = (), allow_gid: int | None = None
    ) -> AccessPolicy:
        own = os.getuid() if hasattr(os, "getuid") else 0
        return cls(own_uid=own, allow_uids=frozenset(allow_uids), allow_gid=allow_gid)

    def allows(self, peer: Peer) -> bool:
        if peer.uid in (0, self.own_uid) or peer.uid in self.allow_uids:
            return True
        gid = self.allow_gid
        if gid is None:
            return False
        if peer.gid == gid:
            return True
        if peer.groups is not None:
            return gid in peer.groups
        return _in_group_database(peer.uid, gid)


def user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "?"
