"""The msgpack socket: a `shell.Listener` whose connections each run a `Conversation`.

The conversation (wire/conversation.py) decides what every byte means and what every request
gets; the shell (shell.py) owns what every connection of either protocol shares (the door,
deadlines, backpressure, close, drain). What is left here is only the msgpack socket's own:
where it listens (its socket file, one passed by a service manager, or a Windows pipe), how a
dispatched request runs, and what a refusal at the door looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..wire.answers import Answer, EmbedAnswer
from ..wire.conversation import Conversation, ConversationLimits, RunRequest, refusal
from ..wire.errors import EmbeddError
from ..wire.messages import Embed, Request
from .activation import Inherited
from .counters import ConnectionCounts, Tally
from .shell import Connection, Handler, Listener, RequestTask, Reservation, Timer
from .sockets import bind_unix_socket, remove_if_ours

__all__ = ["Handler", "Server", "wire_map"]

# Converting vectors to msgpack lists costs ~50 ns a float; beyond this many floats it runs on a
# worker thread so that the event loop keeps serving others meanwhile.
_LIST_ON_LOOP_MAX = 50_000


async def wire_map(answer: Answer, request: Request) -> dict[str, Any]:
    """An answer as the msgpack map PROTOCOL.md documents; an embedding's vectors as the
    request's `encoding` asks, in its `precision`."""
    if not isinstance(answer, EmbedAnswer):
        return answer.to_wire()
    encoding = request.args.encoding if isinstance(request.args, Embed) else "f32"
    if encoding == "list" and answer.vectors.size > _LIST_ON_LOOP_MAX:
        # Building millions of float objects would stall the loop.
        return answer.to_wire(encoding, await asyncio.to_thread(answer.wire_list))
    return answer.to_wire(encoding)


class Server(Listener):
    def __init__(
        self,
        config: Config,
        handler: Handler,
        *,
        tally: Tally | None = None,
        connections: ConnectionCounts | None = None,
        clock: Callable[[], float] = time.monotonic,
        timer: Timer | None = None,
    ) -> None:
        super().__init__(
            config,
            handler,
            connections if connections is not None else ConnectionCounts(),
            clock,
            timer,
        )
        self.tally = tally if tally is not None else Tally()
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        # The socket the service manager passed us (never unlinked or shut down), if any.
        self.inherited: Inherited | None = None
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

    def new_conversation(self, writer: asyncio.StreamWriter) -> Conversation:
        return Conversation(self._limits, self.tally.count)

    def start_task(self, conn: Connection, action: object) -> RequestTask:
        assert isinstance(action, RunRequest), action
        request = action.request
        size = self.handler.answer_size(request)
        return RequestTask(request.id, functools.partial(self._run, request, size, conn))

    async def _run(
        self, request: Request, size: int, conn: Connection, reservation: Reservation
    ) -> dict[str, Any]:
        await reservation.reserve(size)
        # The connection is the owner whose turn it is in the model's scheduler.
        return await wire_map(await self.handler.handle(request, owner=conn), request)

    def refusal(self, error: EmbeddError) -> bytes:
        return refusal(error)

    async def start(self, inherited: Inherited | None = None) -> None:
        if sys.platform == "win32":  # untested: see winpipe.py
            from .winpipe import PipeListener, pipe_name

            self._pipe = PipeListener(pipe_name(), self.on_connect)
            await self._pipe.start()
            return
        if inherited is not None:
            # The service manager's socket: served as it is, never chmod-ed or unlinked.
            self.inherited = inherited
            kwargs: dict[str, Any] = {"sock": inherited.sock}
            if sys.version_info >= (3, 13):
                kwargs["cleanup_socket"] = False  # else asyncio unlinks the path on close
            self._server = await asyncio.start_unix_server(self.on_connect, **kwargs)
            return
        sock = bind_unix_socket(self.config.socket)
        st = os.stat(self.config.socket)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self.on_connect, sock=sock)

    async def stop_accepting(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Close every connection (flushing what each can still take, briefly) and the socket."""
        await self.close_connections()
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
