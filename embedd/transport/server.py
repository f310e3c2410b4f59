"""The asyncio shell around `conversation.Conversation`: sockets, tasks and bytes, no rules.

Each connection has one `Conversation` (the pure object that decides what every byte means and
what every request gets); this module reads bytes into it, carries out the actions it returns
(start a request's task, write these bytes, cancel that task, close) and reports each task's
end back to it. It also owns what only a transport can know: who the peer is, time (idle and
stalled connections), and how much it has not read yet (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Config
from ..wire.conversation import (
    Action,
    CancelTask,
    Close,
    Conversation,
    ConversationLimits,
    Dispatch,
    Send,
    refusal,
)
from ..wire.counters import ConnectionCounts, Tally
from ..wire.errors import Code, EmbeddError
from ..wire.messages import Request
from .activation import Inherited
from .peercred import AccessPolicy, peer_of, user_name
from .sockets import bind_unix_socket, remove_if_ours

_log = logging.getLogger("embedd.server")

_READ_SIZE = 256 * 1024
# After the last frame to a connection the daemon closes (a refusal at the door, a framing
# error), it shuts its write side and reads and discards for this long before closing: closing
# with unread input makes the kernel reset the connection, and the client would then lose the
# frame explaining why (seen by a Node.js client: EPIPE instead of `busy`, 16 times in 16).
CLOSE_GRACE = 1.0
# A connection refused at the door has this long to read its one frame.
_REFUSAL_WRITE_TIMEOUT = 1.0


class Handler(Protocol):
    """What a transport needs of the daemon (daemon.Daemon is one)."""

    @property
    def draining(self) -> bool: ...

    async def handle(self, req: Request, owner: object = None) -> dict[str, Any]: ...

    def answer_size(self, req: Request) -> int:
        """About how many bytes the answer will take (known before any work)."""
        ...


# How often a request waiting for its connection's answer budget looks again (only while the
# client leaves answers unread, so the polling costs nothing in normal operation).
_BUDGET_POLL = 0.05


class AnswerBudget:
    """Bounds the answer bytes a connection holds: computed but unsent, plus being computed.

    A request reserves its answer's size before its work starts and releases it once the answer
    is handed to the transport, where it counts as unsent bytes until the client reads it. So
    a client that does not read stalls its own next requests, not the daemon's memory. A single
    answer larger than the budget still runs when nothing else is held (max_response bounds it).
    """

    def __init__(self, limit: int, unsent: Callable[[], int]) -> None:
        self.limit = limit
        self._unsent = unsent  # () -> bytes the transport has not sent yet
        self.reserved = 0

    def _fits(self, n: int) -> bool:
        held = self.reserved + self._unsent()
        return held == 0 or held + n <= self.limit

    async def acquire(self, n: int) -> None:
        while not self._fits(n):
            await asyncio.sleep(_BUDGET_POLL)
        self.reserved += n

    def release(self, n: int) -> None:
        self.reserved -= n


def _peer_gone(writer: asyncio.StreamWriter) -> bool:
    """After EOF: did the peer close the whole connection (POLLHUP), or only its write side?"""
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(select, "poll"):
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        return any(ev & select.POLLHUP for _fd, ev in poller.poll(0))
    except (OSError, ValueError):
        return True


async def _close_gracefully(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Flush, shut our write side, discard input for `CLOSE_GRACE`, then close."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            while await reader.read(_READ_SIZE):
                pass
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@dataclass(eq=False)
class _Connection:
    server: Server
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conv: Conversation
    tasks: dict[int, asyncio.Task[dict[str, Any]]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The peer's EOF was read (or the stream broke).
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    budget: AnswerBudget | None = None

    @property
    def inflight(self) -> int:
        return self.conv.inflight

    async def run(self) -> None:
        config = self.server.config
        transport = self.writer.transport
        transport.set_write_buffer_limits(high=config.max_unsent)
        self.budget = AnswerBudget(config.max_unsent, transport.get_write_buffer_size)
        try:
            while True:
                wait: float | None = None
                if not self.conv.reading_done:
                    # Backpressure: while the client leaves its answers unread, read no more
                    # of its requests (unsent bytes stay under max_unsent plus what is in
                    # flight, which the answer budget bounds).
                    await self.writer.drain()
                    if not self.conv.inflight:
                        wait = config.frame_timeout if self.conv.mid_frame else config.idle_timeout
                # Once reading is done, this loop only discards input until the peer's EOF or
                # until `_close` closes the transport: a close with unread input would reset
                # the connection and lose the last frames written.
                try:
                    async with asyncio.timeout(wait):
                        data = await self.reader.read(_READ_SIZE)
                except TimeoutError:
                    self._timed_out(wait)
                    continue
                if not data:
                    if not self.conv.reading_done:
                        self.apply(self.conv.peer_closed(gone=_peer_gone(self.writer)))
                    self.eof.set()
                    break
                if not self.conv.reading_done:
                    self.apply(self.conv.receive(data))
            await self.done.wait()
        except OSError:
            self.apply(self.conv.peer_closed(gone=True))
        finally:
            self.eof.set()
            for task in self.tasks.values():
                task.cancel()
            if not self.writer.is_closing():
                self.writer.close()

    def _timed_out(self, wait: float | None) -> None:
        self.server.connections.timed_out += 1
        what = "in the middle of a frame" if self.conv.mid_frame else "with nothing in flight"
        _log.info("closing a connection silent for %gs %s", wait or 0, what)
        self.apply(self.conv.peer_closed(gone=True))

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Dispatch(request):
                    size = self.server.handler.answer_size(request)
                    task = asyncio.create_task(self._handle(request, size))
                    self.tasks[request.id] = task
                    task.add_done_callback(functools.partial(self._finished, request.id, size))
                case Send(data):
                    if not self.writer.is_closing():
                        self.writer.write(data)
                case CancelTask(rid):
                    if (running := self.tasks.get(rid)) is not None:
                        running.cancel()
                case Close():
                    self.server.spawn(self._close())

    async def _handle(self, request: Request, size: int) -> dict[str, Any]:
        assert self.budget is not None
        await self.budget.acquire(size)
        try:
            return await self.server.handler.handle(request, owner=self)
        except BaseException:
            self.budget.release(size)
            raise

    def _finished(self, rid: int, size: int, task: asyncio.Task[dict[str, Any]]) -> None:
        """Every request's task ends here, whether it ran, failed or was cancelled (even before
        it first ran, as when its `cancel` arrived in the same read)."""
        self.tasks.pop(rid, None)
        if self.budget is not None and not task.cancelled() and task.exception() is None:
            self.budget.release(size)  # the answer now counts as unsent transport bytes
        result: dict[str, Any] | EmbeddError
        if task.cancelled():
            result = EmbeddError(Code.CANCELLED, f"request {rid} cancelled")
        elif isinstance(exc := task.exception(), EmbeddError):
            result = exc
        elif exc is not None:
            _log.error("request %s failed", rid, exc_info=exc)
            result = EmbeddError(Code.INTERNAL, f"request failed: {exc!r}")
        else:
            result = task.result()
        self.apply(self.conv.finish(rid, result))

    def abandon(self, error: EmbeddError) -> None:
        """Answer everything still in flight with `error` now (the drain deadline passed)."""
        for rid in list(self.tasks):
            self.apply(self.conv.abandon(rid, error))

    async def _close(self) -> None:
        """Flush, shut our write side, let the read loop discard input until the peer's EOF
        (at most CLOSE_GRACE), then close."""
        if not self.conv.peer_gone:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await self.writer.drain()
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    await self.eof.wait()
        self.writer.close()
        self.done.set()


class Server:
    def __init__(
        self,
        config: Config,
        handler: Handler,
        *,
        tally: Tally | None = None,
        connections: ConnectionCounts | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.handler = handler
        # Monotonic seconds, for `last_activity` (a test's fake clock; see supervise.py).
        self.clock = clock
        self.tally = tally if tally is not None else Tally()
        self.connections = connections if connections is not None else ConnectionCounts()
        self.open: set[_Connection] = set()
        self.background: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        # The socket the service manager passed us (never unlinked or shut down), if any.
        self.inherited: Inherited | None = None
        self.policy = AccessPolicy.for_daemon(config.allow_uids, config.allow_gid)
        # When a connection last opened or closed: the idle-exit clock (see supervise.py).
        self.last_activity = clock()
        self._pipe: Any = None  # winpipe.PipeListener on Windows
        self._limits = ConversationLimits(
            max_frame=config.max_frame,
            max_inflight=config.max_inflight,
            max_inputs=config.max_inputs,
        )

    @property
    def address(self) -> str:
        if self._pipe is not None:
            return str(self._pipe.name)
        return self.inherited.address if self.inherited else str(self.config.socket)

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self.open)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

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
        sock = bind_unix_socket(self.config.socket)
        st = os.stat(self.config.socket)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refused = self._refused_peer(writer)
        if refused is None and self.handler.draining:
            refused = EmbeddError(Code.SHUTTING_DOWN, "the daemon is shutting down")
        if refused is None and len(self.open) >= self.config.max_connections:
            refused = EmbeddError(
                Code.BUSY,
                f"too many connections (limit max_connections = {self.config.max_connections})",
                retry_after=1.0,
                limit=self.config.max_connections,
            )
        if refused is not None:
            self.connections.refused += 1
            writer.write(refusal(refused))
            await _close_gracefully(reader, writer)
            return
        conn = _Connection(self, reader, writer, Conversation(self._limits, self.tally))
        self.open.add(conn)
        self.connections.open += 1
        self.connections.total += 1
        self.last_activity = self.clock()
        try:
            await conn.run()
        finally:
            self.open.discard(conn)
            self.connections.open -= 1
            self.last_activity = self.clock()

    def _refused_peer(self, writer: asyncio.StreamWriter) -> EmbeddError | None:
        """`forbidden` if the peer's uid is not allowed (None: it may connect)."""
        sock = writer.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return None
        try:
            peer = peer_of(sock.fileno())
        except OSError as exc:
            _log.warning("refused a connection: cannot read its credentials: %s", exc)
            return EmbeddError(Code.FORBIDDEN, "the daemon could not read your credentials")
        if peer is None or self.policy.allows(peer):
            return None
        _log.warning(
            "refused a connection from uid %d (%s), gid %s, pid %s: not allowed "
            "(allow_uids / allow_gid in the config)",
            peer.uid,
            user_name(peer.uid),
            peer.gid,
            peer.pid,
        )
        return EmbeddError(
            Code.FORBIDDEN,
            f"uid {peer.uid} may not use this daemon; its owner can allow it with "
            "allow_uids or allow_gid in the config",
        )

    async def stop_accepting(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._server is not None:
            self._server.close()

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds until every request accepted so far is answered; then
        answer what is left `shutting_down`. Returns how many were cut short."""
        deadline = asyncio.get_running_loop().time() + grace
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                while tasks := [t for c in self.open for t in c.tasks.values()]:
                    await asyncio.wait(tasks)
        left = self.inflight
        if left:
            _log.warning(
                "shutdown_grace of %gs passed: answering %d requests shutting_down", grace, left
            )
            err = EmbeddError(
                Code.SHUTTING_DOWN,
                f"the daemon stopped before this request finished (shutdown_grace {grace:g}s)",
                limit=grace,
            )
            for conn in list(self.open):
                conn.abandon(err)
        return left

    async def close(self) -> None:
        """Close every connection (flushing what each can still take, briefly) and the socket."""
        for conn in list(self.open):
            conn.apply(conn.conv.peer_closed(gone=False))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE * 2):
                while self.background:
                    await asyncio.wait(list(self.background))
        for conn in list(self.open):
            conn.writer.transport.abort()
            conn.done.set()
        self._remove_socket()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    def _remove_socket(self) -> None:
        """Remove the socket file, unless it is no longer ours (a newer daemon bound there)."""
        if self.inherited is not None:
            return  # the service manager's: it stays for the next start
        if self._inode is not None:
            remove_if_ours(self.config.socket, self._inode)
