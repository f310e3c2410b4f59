"""One connection's conversation as a pure object: bytes in -> actions out, results -> bytes.

This owns every rule about a request's life on a connection (as h11 owns HTTP's and the
asyncio server only moves bytes): framing, parsing into typed requests, in-flight ids and their
limit, reused ids, `cancel` (also of a request read in the same chunk as its cancel), what a
framing error does, what happens after the peer stops sending, and the answer to every request,
each exactly once. Every answer leaves through `_answer`, which also reports its outcome, so the
counts in `stats` cannot drift from what was sent. Nothing here does I/O or knows about asyncio,
so the tests drive it with bytes alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import Code, EmbeddError
from .framing import FrameDecoder, FrameError, Message, encode_frame
from .messages import Cancel, Limits, Request, parse_request, request_id


@dataclass(frozen=True)
class RunRequest:
    """Run this request (the shell starts a task and reports its end with `finish`)."""

    request: Request


@dataclass(frozen=True)
class Send:
    data: bytes | bytearray  # a large HTTP body is sent as built, not copied into bytes


@dataclass(frozen=True)
class CancelTask:
    """Stop the task running request `rid`; the shell then reports it with `finish`."""

    rid: int


@dataclass(frozen=True)
class Close:
    """Nothing more will be sent on this connection: close it once the sends above are out."""


Action = RunRequest | Send | CancelTask | Close


@dataclass
class _InFlight:
    cancelled_by_client: bool = False


@dataclass(frozen=True)
class ConversationLimits:
    max_frame: int
    max_inflight: int
    max_inputs: int


def _bad_id(message: Message) -> EmbeddError:
    try:
        parse_request(message, Limits())
    except EmbeddError as exc:
        return exc
    raise AssertionError("a message without a valid id parsed")  # pragma: no cover


def response(rid: int | float | None, result: dict[str, Any] | EmbeddError) -> Message:
    if isinstance(result, EmbeddError):
        return {"id": rid, "ok": False, "error": result.to_wire()}
    return {"id": rid, "ok": True, **result}


# Told each answer's outcome (None: it succeeded) as it leaves; the listener counts them.
Outcomes = Callable[[EmbeddError | None], None]


def _ignore(outcome: EmbeddError | None) -> None:
    pass


class Conversation:
    def __init__(self, limits: ConversationLimits, report: Outcomes = _ignore) -> None:
        self.limits = limits
        self.report = report
        self._decoder = FrameDecoder(limits.max_frame)
        self._parse_limits = Limits(max_inputs=limits.max_inputs)
        self._inflight: dict[int, _InFlight] = {}
        # No more requests will be read: the peer stopped sending or the stream broke.
        self.reading_done = False
        # The peer is gone: nothing will be written, answers are dropped (but still counted).
        self.peer_gone = False
        self._close_sent = False
        # The connection's first bytes, kept until a frame has been read: an HTTP client that
        # reached this socket by mistake is told so in HTTP (see _wrong_protocol).
        self._opening = b""
        self._frames = 0

    # --- what the shell asks -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived and the rest has not (the shell's read timeout)."""
        return self._decoder.buffered > 0

    @property
    def frames(self) -> int:
        """Frames read whole so far (the shell's frame deadline restarts when this changes)."""
        return self._frames

    @property
    def wants_data(self) -> bool:
        """Requests are read while any arrive: max_inflight and the shell's backpressure bound
        what they hold."""
        return not self.reading_done

    # --- events in -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Action]:
        """Bytes from the peer."""
        if self.reading_done:
            return []
        actions: list[Action] = []
        if self._frames == 0 and len(self._opening) < _HTTP_SNIFF:
            self._opening += data[: _HTTP_SNIFF - len(self._opening)]
        for event in self._decoder.feed(data):
            if isinstance(event, FrameError) and self._frames == 0 and _is_http(self._opening):
                return self._wrong_protocol()
            self._frames += 1
            if isinstance(event, FrameError):
                # The stream cannot be resynchronised: answer (id unknown), stop reading, and
                # close once the requests read before the broken frame are answered.
                err = EmbeddError(event.code, event.message, limit=event.limit)
                actions += self._answer(None, err)
                self.reading_done = True
                actions += self._maybe_close()
            else:
                actions += self._on_message(event)
        return actions

    def peer_closed(self, *, gone: bool) -> list[Action]:
        """The peer stopped sending. `gone`: it closed the whole connection, so nothing can be
        written any more and work in flight is cancelled; otherwise it only shut its write side
        (a half-close) and still reads the answers to what it sent."""
        self.reading_done = True
        actions: list[Action] = []
        if gone:
            self.peer_gone = True
            actions += [CancelTask(rid) for rid in self._inflight]
        return actions + self._maybe_close()

    def timed_out(self) -> list[Action]:
        """The peer said nothing for idle_timeout, or a frame did not arrive whole within
        frame_timeout of its first byte: it is cut off (PROTOCOL.md, Limits)."""
        return self.peer_closed(gone=True)

    def shutdown(self) -> list[Action]:
        """The daemon started draining. A msgpack connection stays open: the requests it
        still sends are answered `shutting_down` (PROTOCOL.md), and the connection is closed
        once the drain is over."""
        return []

    def finish(self, rid: int, result: dict[str, Any] | EmbeddError) -> list[Action]:
        """The task of request `rid` ended with this result (or error)."""
        state = self._inflight.pop(rid, None)
        if state is None:
            return []
        if (
            isinstance(result, EmbeddError)
            and result.code == Code.CANCELLED
            and state.cancelled_by_client
        ):
            result = EmbeddError(Code.CANCELLED, f"request {rid} cancelled by the client")
        return self._answer(rid, result) + self._maybe_close()

    def abandon(self, rid: int, error: EmbeddError) -> list[Action]:
        """Answer a request now, without waiting for its task (the daemon's drain deadline
        passed), and have the task stopped."""
        if rid not in self._inflight:
            return []
        return [CancelTask(rid), *self.finish(rid, error)]

    # --- the rules -----------------------------------------------------------------------------

    def _on_message(self, message: Message) -> list[Action]:
        rid = request_id(message)
        if rid is None:
            # A number that is no valid id (a float, as JavaScript encoders send ids >= 2**32,
            # or a negative one) is echoed back so the caller can still match the refusal;
            # anything else gets nil.
            raw = message.get("id")
            if isinstance(raw, int | float) and not isinstance(raw, bool):
                return self._answer(raw, _bad_id(message))
        try:
            req = parse_request(message, self._parse_limits)
            if req.id in self._inflight:
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    f"id {req.id} is already in flight on this connection",
                    key="id",
                )
            if isinstance(req.args, Cancel):
                return self._cancel(req.id, req.args.target)
            if len(self._inflight) >= self.limits.max_inflight:
                raise EmbeddError(
                    Code.BUSY,
                    f"this connection already has {len(self._inflight)} requests in flight "
                    f"(limit max_inflight = {self.limits.max_inflight})",
                    retry_after=_INFLIGHT_RETRY_AFTER,
                    limit=self.limits.max_inflight,
                )
        except EmbeddError as exc:
            return self._answer(rid, exc)
        self._inflight[req.id] = _InFlight()
        return [RunRequest(req)]

    def _cancel(self, rid: int, target: int) -> list[Action]:
        state = self._inflight.get(target)
        cancelled = state is not None and not state.cancelled_by_client
        actions = self._answer(rid, {"cancelled": cancelled})
        if state is not None and cancelled:
            state.cancelled_by_client = True
            actions.append(CancelTask(target))
        return actions

    def _answer(
        self, rid: int | float | None, result: dict[str, Any] | EmbeddError
    ) -> list[Action]:
        """The one way out for an answer: counted whether or not it can still be written."""
        self.report(result if isinstance(result, EmbeddError) else None)
        if self.peer_gone or self._close_sent:
            return []
        return [Send(encode_frame(response(rid, result)))]

    def _wrong_protocol(self) -> list[Action]:
        """An HTTP request on the msgpack socket: its first bytes read as a length prefix of
        over a gigabyte, and a `frame_too_large` frame would mean nothing to an HTTP client
        (curl says "Received HTTP/0.9"). Answer in its own language, once, then close."""
        self.report(EmbeddError(Code.PROTOCOL_ERROR, "HTTP on the msgpack socket"))
        self.reading_done = True
        self._close_sent = True
        body = (
            b"This is embedd's msgpack socket (PROTOCOL.md). The OpenAI- and Ollama-compatible "
            b"HTTP API is served on its own socket: start the daemon with --http-socket PATH or "
            b"--http HOST:PORT and send HTTP there.\n"
        )
        head = (
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        return [Send(head + body), Close()]

    def _maybe_close(self) -> list[Action]:
        if self.reading_done and not self._inflight and not self._close_sent:
            self._close_sent = True
            return [Close()]
        return []


# A client at its in-flight limit can retry as soon as one of its answers arrives; a tenth of a
# second is a few batches' time (on 2 cores a query batch takes ~4 ms, a chunk batch ~90 ms).
_INFLIGHT_RETRY_AFTER = 0.1


# The first four bytes of the HTTP/1.1 request methods (RFC 9110 section 9, and PATCH): the
# length prefix the frame decoder refuses. Each starts with an uppercase letter, so as a length
# it reads as over 1 GiB, beyond any max_frame: no valid msgpack frame can be taken for one.
_HTTP_OPENINGS = (
    b"GET ", b"HEAD", b"POST", b"PUT ", b"DELE", b"CONN", b"OPTI", b"TRAC", b"PATC",
)  # fmt: skip
_HTTP_SNIFF = 4


def _is_http(opening: bytes) -> bool:
    return opening[:_HTTP_SNIFF] in _HTTP_OPENINGS


def refusal(error: EmbeddError) -> bytes:
    """The one frame sent to a connection refused at the door (busy, forbidden, draining)."""
    return encode_frame(response(None, error))
