"""The asyncio shell: the listening socket, one reader per connection, one task per request.

Framing is `protocol.FrameDecoder`'s job and answering is `daemon.Daemon`'s; this module only
moves bytes, enforces the per-connection limits and makes sure every accepted request gets
exactly one answer (or is cancelled when its client goes away).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .activation import Inherited
from .config import Config
from .daemon import Daemon
from .errors import Code, EmbeddError
from .messages import CancelArgs, parse_request, request_id
from .peercred import AccessPolicy, peer_of, user_name
from .protocol import FrameDecoder, FrameError, Message, encode_frame

_log = logging.getLogger("embedd.server")

_READ_SIZE = 256 * 1024
# Linux sun_path is 108 bytes including the terminating NUL (macOS: 104).
_MAX_SOCKET_PATH = 107


class SocketInUseError(Exception):
    """Another daemon answers on the socket path, or the path cannot be ours."""


@dataclass(eq=False)
class _Pending:
    task: asyncio.Task[None] | None = None
    cancelled_by_client: bool = False


@dataclass(eq=False)
class _Connection:
    server: Server
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    inflight: dict[int, _Pending] = field(default_factory=dict)
    closing: bool = False

    async def run(self) -> None:
        decoder = FrameDecoder(self.server.config.max_frame)
        client_gone = True
        try:
            while not decoder.closed:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    break
                for event in decoder.feed(data):
                    if isinstance(event, FrameError):
                        _log.warning("closing a connection: %s", event.message)
                        err = EmbeddError(event.code, event.message, limit=event.limit)
                        self.server.daemon.count(err)
                        await self.send({"id": None, "ok": False, "error": err.to_wire()})
                        client_gone = False
                    else:
                        self._accept(event)
        except (ConnectionError, OSError):
            pass
        finally:
            tasks = [p.task for p in self.inflight.values() if p.task is not None]
            if client_gone:
                # The client went away: its pending work is cancelled.
                self.closing = True
                for task in tasks:
                    task.cancel()
            elif tasks:
                # The stream broke but the client is there: answer what was read before it.
                await asyncio.wait(tasks)
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()

    def _accept(self, message: Message) -> None:
        rid = request_id(message)
        try:
            req = parse_request(message, max_inputs=self.server.config.max_inputs)
            if req.id in self.inflight:
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    f"id {req.id} is already in flight on this connection",
                    key="id",
                )
            if req.op == "cancel":
                assert isinstance(req.args, CancelArgs)
                self.server.daemon.count(None)
                self._reply_soon(rid, {"cancelled": self._cancel(req.args.target)})
                return
            if len(self.inflight) >= self.server.config.max_inflight:
                raise EmbeddError(
                    Code.BUSY,
                    f"this connection already has {len(self.inflight)} requests in flight "
                    f"(limit {self.server.config.max_inflight})",
                    retry_after=0.1,
                    limit=self.server.config.max_inflight,
                )
        except EmbeddError as exc:
            self.server.daemon.count(exc)
            self._reply_soon(rid, exc)
            return
        pending = _Pending()
        self.inflight[req.id] = pending
        pending.task = asyncio.create_task(self._answer(req.id, req, pending))
        pending.task.add_done_callback(
            functools.partial(self._cancelled_unstarted, req.id, pending)
        )

    def _cancelled_unstarted(self, rid: int, pending: _Pending, _task: asyncio.Task[None]) -> None:
        """A task cancelled before it first ran (its `cancel` arrived in the same read) never
        executes `_answer`, so its bookkeeping and its `cancelled` answer are done here."""
        if self.inflight.get(rid) is not pending:
            return  # `_answer` ran and cleaned up
        del self.inflight[rid]
        err = EmbeddError(Code.CANCELLED, f"request {rid} cancelled by the client")
        self.server.daemon.count(err)
        if pending.cancelled_by_client and not self.closing:
            self._reply_soon(rid, err)

    def _cancel(self, target: int) -> bool:
        pending = self.inflight.get(target)
        if pending is None or pending.task is None or pending.cancelled_by_client:
            return False
        pending.cancelled_by_client = True
        pending.task.cancel()
        return True

    def _reply_soon(self, rid: int | None, result: dict[str, Any] | EmbeddError) -> None:
        task = asyncio.create_task(self.send(_response(rid, result)))
        self.server.background.add(task)
        task.add_done_callback(self.server.background.discard)

    async def _answer(self, rid: int, req: Any, pending: _Pending) -> None:
        result: dict[str, Any] | EmbeddError
        try:
            result = await self.server.daemon.handle(req, owner=self)
        except EmbeddError as exc:
            result = exc
        except asyncio.CancelledError:
            self.inflight.pop(rid, None)
            if not pending.cancelled_by_client or self.closing:
                self.server.daemon.count(EmbeddError(Code.CANCELLED, "client went away"))
                raise
            result = EmbeddError(Code.CANCELLED, f"request {rid} cancelled by the client")
        except Exception as exc:
            _log.exception("request %s (%s) failed", rid, req.op)
            result = EmbeddError(Code.INTERNAL, f"{req.op} failed: {exc!r}")
        self.inflight.pop(rid, None)
        self.server.daemon.count(result if isinstance(result, EmbeddError) else None)
        await self.send(_response(rid, result))

    async def send(self, message: Message) -> None:
        if self.writer.is_closing():
            return
        try:
            self.writer.write(encode_frame(message))
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass


def _response(rid: int | None, result: dict[str, Any] | EmbeddError) -> Message:
    if isinstance(result, EmbeddError):
        return {"id": rid, "ok": False, "error": result.to_wire()}
    return {"id": rid, "ok": True, **result}


class Server:
    def __init__(self, config: Config, daemon: Daemon) -> None:
        self.config = config
        self.daemon = daemon
        self.connections: set[_Connection] = set()
        self.background: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        # The socket the service manager passed us (never unlinked or shut down), if any.
        self.inherited: Inherited | None = None
        self.policy = AccessPolicy.for_daemon(config.allow_uids, config.allow_gid)
        # When a connection last opened or closed: the idle-exit clock (see supervise.py).
        self.last_activity = time.monotonic()
        self._pipe: Any = None  # winpipe.PipeListener on Windows

    @property
    def address(self) -> str:
        if self._pipe is not None:
            return str(self._pipe.name)
        return self.inherited.address if self.inherited else str(self.config.socket)

    @property
    def inflight(self) -> int:
        return sum(len(c.inflight) for c in self.connections)

    async def start(self, inherited: Inherited | None = None) -> None:
        if sys.platform == "win32":  # untested: see winpipe.py
            from .winpipe import PipeListener, pipe_name

            self._pipe = PipeListener(pipe_name(), self._on_connect)
            await self._pipe.start()
            return
        if inherited is not None:
            # The service manager's socket: served as it is, never chmod-ed or unlinked.
            self.inherited = inherited
            kwargs: dict[str, Any] = {"sock": inherited.sock}
            if sys.version_info >= (3, 13):
                kwargs["cleanup_socket"] = False  # else asyncio unlinks the path on close
            self._server = await asyncio.start_unix_server(self._on_connect, **kwargs)
            return
        sock = _bind(self.config.socket)
        st = os.stat(self.config.socket)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        daemon = self.daemon
        if await self._refused_peer(writer):
            return
        if daemon.draining or len(self.connections) >= self.config.max_connections:
            daemon.connections_refused += 1
            if daemon.draining:
                err = EmbeddError(Code.SHUTTING_DOWN, "the daemon is shutting down")
            else:
                err = EmbeddError(
                    Code.BUSY,
                    f"too many connections (limit {self.config.max_connections})",
                    retry_after=1.0,
                    limit=self.config.max_connections,
                )
            with contextlib.suppress(ConnectionError, OSError):
                writer.write(encode_frame(_response(None, err)))
                await writer.drain()
            writer.close()
            return
        conn = _Connection(self, reader, writer)
        self.connections.add(conn)
        daemon.connections_open += 1
        self.last_activity = time.monotonic()
        daemon.connections_total += 1
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            daemon.connections_open -= 1
            self.last_activity = time.monotonic()

    async def _refused_peer(self, writer: asyncio.StreamWriter) -> bool:
        """Answer `forbidden` and close if the peer's uid is not allowed; returns whether so."""
        sock = writer.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return False
        try:
            peer = peer_of(sock.fileno())
        except OSError as exc:
            _log.warning("refused a connection: cannot read its credentials: %s", exc)
            why = "the daemon could not read your credentials"
        else:
            if peer is None or self.policy.allows(peer):
                return False
            _log.warning(
                "refused a connection from uid %d (%s), gid %s, pid %s: not allowed "
                "(allow_uids / allow_gid in the config)",
                peer.uid,
                user_name(peer.uid),
                peer.gid,
                peer.pid,
            )
            why = (
                f"uid {peer.uid} may not use this daemon; its owner can allow it with "
                "allow_uids or allow_gid in the config"
            )
        self.daemon.connections_refused += 1
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(encode_frame(_response(None, EmbeddError(Code.FORBIDDEN, why))))
            await writer.drain()
        writer.close()
        return True

    async def stop_accepting(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._server is not None:
            self._server.close()

    async def drain(self) -> None:
        """Wait until every request accepted so far has been answered."""
        while True:
            tasks = [
                p.task for c in self.connections for p in c.inflight.values() if p.task is not None
            ]
            tasks += list(self.background)
            if not tasks:
                return
            await asyncio.wait(tasks)

    async def close(self) -> None:
        for conn in list(self.connections):
            conn.writer.close()
        self._remove_socket()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    def _remove_socket(self) -> None:
        """Remove the socket file, unless it is no longer ours (a newer daemon bound there)."""
        if self.inherited is not None:
            return  # the service manager's: it stays for the next start
        path = self.config.socket
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return
        if self._inode == (st.st_dev, st.st_ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


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


def _bind(path: Path) -> socket.socket:
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
        if exc.errno in (98, 48):  # EADDRINUSE on Linux / macOS: another daemon won the race
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
