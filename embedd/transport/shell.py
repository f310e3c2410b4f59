"""The connection rules both protocols share: one asyncio shell around a pure conversation.

The msgpack socket (`server.py`) and the HTTP front (`http/server.py`) each hand this module a
conversation (a pure object: bytes in, actions out) and a way to start the work a dispatch
names. Everything else about a connection is decided here, once, for both:
- the door: peer credentials, draining, and the connection cap (`max_connections` per door:
  a listener serving both a Unix socket and TCP counts each apart), with refusals that linger
  only while few are lingering, so fds stay bounded;
- reading: `idle_timeout` while nothing is in flight, and `frame_timeout` as a deadline from a
  frame's first byte (not from the last read: a client trickling a byte every few seconds must
  not hold a partial frame forever);
- backpressure: while a client leaves `max_unsent` answer bytes unread, none of its requests
  are read, and each request reserves its answer's size before its work starts;
- the write deadline: a client that takes none of its unsent answer bytes for `idle_timeout`
  is cut off and its buffers freed;
- half-close (the answers still go out), graceful close, and the shutdown drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import select
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import Config
from ..wire.answers import Answer, Sizing
from ..wire.conversation import CancelTask, Close, Send
from ..wire.errors import Code, EmbeddError
from ..wire.messages import Request
from .counters import ConnectionCounts
from .peercred import AccessPolicy, peer_of, user_name

_log = logging.getLogger("embedd.server")

_READ_SIZE = 256 * 1024
# After the last bytes to a connection the daemon closes (a refusal at the door, a framing
# error), it shuts its write side and reads and discards for this long before closing: closing
# with unread input makes the kernel reset the connection, and the client would then lose the
# frame explaining why (seen by a Node.js client: EPIPE instead of `busy`, 16 times in 16).
CLOSE_GRACE = 1.0
# How often a request waiting for its connection's answer budget looks again (only while the
# client leaves answers unread, so the polling costs nothing in normal operation).
_BUDGET_POLL = 0.05


class Handler(Protocol):
    """What a transport needs of the daemon (daemon.ops.Daemon is one)."""

    @property
    def draining(self) -> bool: ...

    async def handle(
        self,
        req: Request,
        owner: object = None,
        *,
        sizing: Sizing | None = None,
        reserve: Callable[[int], Awaitable[None]] | None = None,
    ) -> Answer: ...

    def answer_size(self, req: Request) -> int:
        """About how many bytes the answer will take (known before any work)."""
        ...


class Conversational(Protocol):
    """A connection's protocol rules as a pure object (wire.conversation, http.conversation).

    Every method returns actions: `Send`, `CancelTask`, `Close`, or a dispatch the listener
    turns into a `RequestTask`.
    """

    @property
    def reading_done(self) -> bool:
        """No more bytes will be fed (the peer stopped sending, or the stream broke)."""
        ...

    @property
    def peer_gone(self) -> bool:
        """Nothing can be written any more."""
        ...

    @property
    def inflight(self) -> int: ...

    @property
    def mid_frame(self) -> bool:
        """Part of a frame (a msgpack frame, an HTTP request) has arrived and the rest has not."""
        ...

    @property
    def frames(self) -> int:
        """Frames completed so far: a change means the partial one is a new frame."""
        ...

    @property
    def wants_data(self) -> bool:
        """Whether the shell should read now (HTTP reads no further while it answers)."""
        ...

    def receive_data(self, data: bytes) -> Sequence[object]: ...

    def peer_closed(self, *, gone: bool) -> Sequence[object]: ...

    def timed_out(self) -> Sequence[object]:
        """The idle or frame deadline passed."""
        ...

    def finish(self, rid: int, result: Any) -> Sequence[object]: ...

    def abandon(self, rid: int, error: EmbeddError) -> Sequence[object]: ...

    def shutdown(self) -> Sequence[object]:
        """The daemon started draining."""
        ...


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


class Reservation:
    """One request's share of its connection's answer budget, released when its task ends
    (whether it answered, failed or was cancelled)."""

    def __init__(self, budget: AnswerBudget) -> None:
        self._budget = budget
        self.held = 0

    async def reserve(self, n: int) -> None:
        await self._budget.acquire(n)
        self.held += n

    def release(self) -> None:
        self._budget.release(self.held)
        self.held = 0


class Timer:
    """What a connection's deadlines (`idle_timeout`, `frame_timeout`, the write deadline) are
    measured and enforced by: the event loop's clock. A test hands the shell one that moves only
    when the test advances it, so that deadlines are checked without waiting for them."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def deadline(self, when: float | None) -> contextlib.AbstractAsyncContextManager[object]:
        """The block is interrupted with TimeoutError once `now()` reaches `when` (None: never)."""
        return asyncio.timeout_at(when)


@dataclass(frozen=True)
class RequestTask:
    """The work a dispatch names: `work(reservation)` returns what `finish` is given."""

    rid: int
    work: Callable[[Reservation], Coroutine[Any, Any, Any]]


class FrameClock:
    """When the frame being read began. Its deadline runs from its first byte, whatever
    arrives after it (a timeout per read would let a byte-a-second trickle hold it forever)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self._frames = -1

    def observe(self, mid_frame: bool, frames: int, now: float) -> None:
        if not mid_frame:
            self.started = None
        elif self.started is None or frames != self._frames:
            self.started = now
        self._frames = frames


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


def _release(writer: asyncio.StreamWriter) -> None:
    """Close now: with unsent bytes left, `close()` would keep the fd and the buffer until a
    client that is not reading takes them, so those are dropped."""
    if writer.transport.get_write_buffer_size():
        writer.transport.abort()
    else:
        writer.close()


async def _close_gracefully(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Flush, shut our write side, discard input for `CLOSE_GRACE`, then close."""
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            while await reader.read(_READ_SIZE):
                pass
    _release(writer)
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@dataclass(eq=False)
class Connection:
    listener: Listener
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conv: Conversational
    tasks: dict[int, asyncio.Task[Any]] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # The peer's EOF was read (or the stream broke).
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    # Set after actions are applied: the read loop waits on it while the conversation reads
    # nothing (HTTP answering a request).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    budget: AnswerBudget | None = None
    clock: FrameClock = field(default_factory=FrameClock)
    # Which of its listener's doors it came in by (`Listener.door`): the cap is per door.
    door: str = ""
    write_watch: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return self.conv.inflight

    async def run(self) -> None:
        config = self.listener.config
        transport = self.writer.transport
        transport.set_write_buffer_limits(high=config.max_unsent)
        self.budget = AnswerBudget(config.max_unsent, transport.get_write_buffer_size)
        timer = self.listener.timer
        try:
            while True:
                deadline: float | None = None
                if not self.conv.reading_done:
                    # Backpressure: while the client leaves its answers unread, read no more
                    # of its requests (unsent bytes stay under max_unsent plus what is in
                    # flight, which the answer budget bounds; `_watch_writes` bounds the time).
                    await self.writer.drain()
                    if not self.conv.wants_data:
                        self.wake.clear()
                        await self.wake.wait()
                        continue
                    now = timer.now()
                    self.clock.observe(self.conv.mid_frame, self.conv.frames, now)
                    if self.clock.started is not None:
                        deadline = self.clock.started + config.frame_timeout
                    elif not self.conv.inflight:
                        deadline = now + config.idle_timeout
                # Once reading is done, this loop only discards input until the peer's EOF or
                # until `_close` closes the transport: a close with unread input would reset
                # the connection and lose the last bytes written.
                try:
                    async with timer.deadline(deadline):
                        data = await self.reader.read(_READ_SIZE)
                except TimeoutError:
                    self._timed_out()
                    continue
                if not data:
                    if not self.conv.reading_done:
                        self.apply(self.conv.peer_closed(gone=_peer_gone(self.writer)))
                    self.eof.set()
                    break
                if not self.conv.reading_done:
                    self.apply(self.conv.receive_data(data))
            await self.done.wait()
        except OSError:
            self.apply(self.conv.peer_closed(gone=True))
        finally:
            self.eof.set()
            for task in self.tasks.values():
                task.cancel()
            if self.write_watch is not None:
                self.write_watch.cancel()
            if not self.writer.is_closing():
                _release(self.writer)

    async def _drain(self) -> bool:
        """Wait while the client holds more than the high-water mark unread. False when it took
        none of it for `idle_timeout` (the write deadline)."""
        transport, timer = self.writer.transport, self.listener.timer
        while True:
            before = transport.get_write_buffer_size()
            try:
                async with timer.deadline(timer.now() + self.listener.config.idle_timeout):
                    await self.writer.drain()
                return True
            except TimeoutError:
                if transport.get_write_buffer_size() >= before:
                    return False

    def _timed_out(self) -> None:
        self.listener.connections.timed_out += 1
        config = self.listener.config
        # Which deadline fired, in words and seconds: tests and operators read it from the log.
        if self.conv.mid_frame:
            what = f"whose frame did not arrive whole within {config.frame_timeout:g}s"
            limit = "frame_timeout"
        else:
            what = f"silent for {config.idle_timeout:g}s with nothing in flight"
            limit = "idle_timeout"
        _log.info("closing a connection %s (%s)", what, limit)
        self.apply(self.conv.timed_out())

    def _watch_writes(self) -> None:
        """Once more than `max_unsent` waits to be read, the client has `idle_timeout` to take
        some of it, whatever the read loop is doing (else a client that never reads its
        answers holds their memory, 1.9 GB of it in one hostile test, past idle_timeout)."""
        over = self.writer.transport.get_write_buffer_size() > self.listener.config.max_unsent
        if over and (self.write_watch is None or self.write_watch.done()):
            self.write_watch = asyncio.create_task(self._write_deadline())

    async def _write_deadline(self) -> None:
        with contextlib.suppress(OSError):
            if not await self._drain():
                self._write_timed_out()

    def _write_timed_out(self) -> None:
        self.listener.connections.timed_out += 1
        _log.info(
            "closing a connection that read none of its answers for %gs",
            self.listener.config.idle_timeout,
        )
        self.writer.transport.abort()
        self.apply(self.conv.peer_closed(gone=True))

    def apply(self, actions: Sequence[object]) -> None:
        for action in actions:
            match action:
                case Send(data):
                    if not self.writer.is_closing():
                        self.writer.write(data)
                        self._watch_writes()
                case CancelTask(rid):
                    if (running := self.tasks.get(rid)) is not None:
                        running.cancel()
                case Close():
                    self.listener.spawn(self._close())
                case _:
                    self._start(self.listener.start_task(self, action))
        self.wake.set()

    def _start(self, request_task: RequestTask) -> None:
        assert self.budget is not None
        reservation = Reservation(self.budget)
        task = asyncio.create_task(request_task.work(reservation))
        self.tasks[request_task.rid] = task
        task.add_done_callback(functools.partial(self._finished, request_task.rid, reservation))

    def _finished(self, rid: int, reservation: Reservation, task: asyncio.Task[Any]) -> None:
        """Every request's task ends here, whether it ran, failed or was cancelled (even before
        it first ran, as when its `cancel` arrived in the same read)."""
        self.tasks.pop(rid, None)
        reservation.release()  # a written answer now counts as unsent transport bytes
        result: Any
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
        """Let the client take every answer (within the write deadline), shut our write side,
        let the read loop discard input until the peer's EOF (at most CLOSE_GRACE), close."""
        if not self.conv.peer_gone:
            with contextlib.suppress(OSError):
                # Drain to empty: the last answer may be larger than max_unsent.
                self.writer.transport.set_write_buffer_limits(high=0, low=0)
                if await self._drain():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(CLOSE_GRACE):
                            if self.writer.can_write_eof():
                                self.writer.write_eof()
                            await self.eof.wait()
        _release(self.writer)
        self.done.set()


class Listener:
    """One listening socket's connections: the door, the set of open ones, drain and close.
    A protocol's listener says how to start a conversation, how to start the work a dispatch
    names, and what a refusal at the door looks like."""

    def __init__(
        self,
        config: Config,
        handler: Handler,
        connections: ConnectionCounts,
        clock: Callable[[], float] = time.monotonic,
        timer: Timer | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        self.connections = connections
        # Monotonic seconds, for `last_activity` (a test's fake clock; see supervise.py).
        self.clock = clock
        self.timer = timer if timer is not None else Timer()
        self.open: set[Connection] = set()
        # Open connections per door (`door`), each held to max_connections.
        self._per_door: dict[str, int] = {}
        self.background: set[asyncio.Task[None]] = set()
        self.policy = AccessPolicy.for_daemon(config.allow_uids, config.allow_gid)
        # Refusals still lingering (CLOSE_GRACE) so their last bytes arrive: bounded like the
        # connections, so a flood of newcomers cannot hold more fds than that either.
        self._lingering = 0
        # When a connection last opened or closed: the idle-exit clock (see supervise.py).
        self.last_activity = clock()

    # --- what each protocol says -----------------------------------------------------------

    def new_conversation(self, writer: asyncio.StreamWriter) -> Conversational:
        raise NotImplementedError

    def start_task(self, conn: Connection, action: object) -> RequestTask:
        raise NotImplementedError

    def refusal(self, error: EmbeddError) -> bytes:
        """The bytes sent to a connection refused at the door (busy, forbidden, draining)."""
        raise NotImplementedError

    def door(self, writer: asyncio.StreamWriter) -> str:
        """Which door a connection came in by, when a listener has several whose callers must
        not crowd each other out (HTTP: the Unix socket, whose peers are checked, and TCP,
        which anyone on the machine reaches). One door by default."""
        return ""

    # --- shared ------------------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return sum(c.inflight for c in self.open)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refused = self._refused_peer(writer)
        if refused is None and self.handler.draining:
            refused = EmbeddError(Code.SHUTTING_DOWN, "the daemon is shutting down")
        door = self.door(writer)
        if refused is None and self._per_door.get(door, 0) >= self.config.max_connections:
            refused = EmbeddError(
                Code.BUSY,
                f"too many connections (limit max_connections = {self.config.max_connections})",
                retry_after=1.0,
                limit=self.config.max_connections,
            )
        if refused is not None:
            await self._refuse(reader, writer, refused)
            return
        conn = Connection(self, reader, writer, self.new_conversation(writer), door=door)
        self.open.add(conn)
        self._per_door[door] = self._per_door.get(door, 0) + 1
        self.connections.open += 1
        self.connections.total += 1
        self.last_activity = self.clock()
        try:
            await conn.run()
        finally:
            self.open.discard(conn)
            self._per_door[door] -= 1
            self.connections.open -= 1
            self.last_activity = self.clock()

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: EmbeddError
    ) -> None:
        self.connections.refused += 1
        writer.write(self.refusal(error))
        if self._lingering >= self.config.max_connections:
            _release(writer)  # a flood: its fds go back at once
            return
        self._lingering += 1
        try:
            await _close_gracefully(reader, writer)
        finally:
            self._lingering -= 1

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

    async def drain(self, grace: float) -> int:
        """Wait up to `grace` seconds until every request accepted so far is answered; then
        answer what is left `shutting_down`. Returns how many were cut short."""
        for conn in list(self.open):
            conn.apply(conn.conv.shutdown())
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

    async def close_connections(self) -> None:
        """Close every connection, flushing what each can still take, briefly."""
        for conn in list(self.open):
            conn.apply(conn.conv.peer_closed(gone=False))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE * 2):
                while self.background:
                    await asyncio.wait(list(self.background))
        for conn in list(self.open):
            conn.writer.transport.abort()
            conn.done.set()
