"""Client for the embedd daemon (wire protocol version 1, see PROTOCOL.md).

This file is meant to be copied into other projects as is: it depends only on the standard
library, msgpack and numpy, and repeats the few rules of the daemon it needs (such as the
default socket path) instead of importing them.

`Client` is blocking and sends one request at a time; `AsyncClient` pipelines many requests
from many tasks over one connection. Both raise `EmbeddError` subclasses, one per error code
of the protocol, so callers can catch exactly the failures they can handle (`BusyError` has a
`retry_after`, `InputTooLongError` an `index` and a `limit`, and so on).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

__all__ = [
    "AsyncClient",
    "BadRequestError",
    "BusyError",
    "Client",
    "DaemonUnavailableError",
    "EmbeddError",
    "ForbiddenError",
    "FrameTooLargeError",
    "InputTooLongError",
    "InternalError",
    "ModelLoadFailedError",
    "ProtocolError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ShuttingDownError",
    "UnknownModelError",
    "UnknownOpError",
    "default_socket_path",
]

# Larger than the daemon's default max_frame (64 MiB) so that a daemon configured for big
# batches still works, yet bounded so that a corrupt length prefix cannot make us allocate
# gigabytes.
DEFAULT_MAX_FRAME = 1 << 30

_HEADER = struct.Struct(">I")
# Extra seconds we wait beyond a daemon-side `timeout`, so that the daemon's own `timeout`
# error (which says more) normally arrives before we give up ourselves.
_TIMEOUT_GRACE = 2.0
# Seconds to wait for an answer: longer than the daemon's default request_timeout (120 s),
# so that a large request gets the daemon's own `timeout` error rather than ours; None waits
# forever.
DEFAULT_TIMEOUT = 150.0

PathArg = str | os.PathLike[str]
Vectors = npt.NDArray[np.float32]


def default_socket_path() -> Path:
    """The socket the daemon listens on when neither side names one.

    Duplicated from the daemon on purpose, so that this module stands alone.
    """
    if os.environ.get("EMBEDD_SOCKET"):
        return Path(os.environ["EMBEDD_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "embedd" / "embedd.sock"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(f"/tmp/embedd-{uid}") / "embedd.sock"


# --------------------------------------------------------------------------------------------
# Errors


class EmbeddError(Exception):
    """An error answered by the daemon, or met while talking to it.

    The optional details are attributes (None when the daemon did not send them) so that
    callers need not dig in `details`, which still holds the whole error map for anything a
    newer daemon may add.
    """

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details) if details is not None else {}
        self.details.setdefault("code", code)
        self.details.setdefault("message", message)
        self.retry_after: float | None = _opt_float(self.details.get("retry_after"))
        self.index: int | None = _opt_int(self.details.get("index"))
        self.limit: float | None = _opt_number(self.details.get("limit"))
        self.tokens: int | None = _opt_int(self.details.get("tokens"))
        key = self.details.get("key")
        self.key: str | None = key if isinstance(key, str) else None


class BadRequestError(EmbeddError):
    """A missing, mistyped or unknown argument, an empty input, or a reused id."""


class UnknownOpError(EmbeddError):
    """The daemon does not know the operation (it may be older than this client)."""


class UnknownModelError(EmbeddError):
    """The model name is not in the daemon's configuration."""


class ModelLoadFailedError(EmbeddError):
    """The model file is missing, not GGUF, or not an embedding model."""


class InputTooLongError(EmbeddError):
    """An input exceeds the model's `max_tokens`; pass `truncate=True` to cut it instead."""


class BusyError(EmbeddError):
    """The daemon's queue is full; retrying after `retry_after` seconds makes sense."""


class RequestTimeoutError(EmbeddError):
    """The request did not finish in time, on the daemon's side or on ours."""


class RequestCancelledError(EmbeddError):
    """The request was cancelled, or its model was unloaded before it ran."""


class ShuttingDownError(EmbeddError):
    """The daemon is draining and accepts no new work."""


class FrameTooLargeError(EmbeddError):
    """A frame exceeded the receiver's limit; the connection was closed."""


class ProtocolError(EmbeddError):
    """The byte stream could not be understood; the connection was closed."""


class ForbiddenError(EmbeddError):
    """The daemon refused: shutdown is not allowed, or this user may not connect."""


class InternalError(EmbeddError):
    """A bug in the daemon."""


class DaemonUnavailableError(EmbeddError):
    """The daemon could not be reached, or the connection to it was lost."""

    def __init__(self, message: str, details: Mapping[str, Any] | None = None):
        super().__init__("unavailable", message, details)


_ERROR_CLASSES: dict[str, type[EmbeddError]] = {
    "bad_request": BadRequestError,
    "unknown_op": UnknownOpError,
    "unknown_model": UnknownModelError,
    "model_load_failed": ModelLoadFailedError,
    "input_too_long": InputTooLongError,
    "busy": BusyError,
    "timeout": RequestTimeoutError,
    "cancelled": RequestCancelledError,
    "shutting_down": ShuttingDownError,
    "frame_too_large": FrameTooLargeError,
    "protocol_error": ProtocolError,
    "forbidden": ForbiddenError,
    "internal": InternalError,
}


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _opt_float(value: Any) -> float | None:
    number = _opt_number(value)
    return None if number is None else float(number)


def _error_from_map(error: Any) -> EmbeddError:
    if not isinstance(error, Mapping):
        return ProtocolError("protocol_error", f"error response without an error map: {error!r}")
    code = error.get("code")
    code = code if isinstance(code, str) else "internal"
    message = error.get("message")
    message = message if isinstance(message, str) else "(no message)"
    return _ERROR_CLASSES.get(code, EmbeddError)(code, message, error)


def _unavailable(path: Path, what: str, cause: BaseException | str) -> DaemonUnavailableError:
    if isinstance(cause, str):
        reason = cause
    elif isinstance(cause, OSError) and cause.strerror:
        reason = cause.strerror
    else:
        reason = str(cause) or type(cause).__name__
    return DaemonUnavailableError(
        f"{what} the embedd daemon at {path}: {reason}. "
        "Is it running? Start it with `embedd serve`.",
        {"path": str(path)},
    )


def _client_timeout(limit: float | None) -> RequestTimeoutError:
    return RequestTimeoutError(
        "timeout", f"no response from the daemon within {limit} s", {"limit": limit}
    )


# --------------------------------------------------------------------------------------------
# Framing, shared by both clients


class _ConnectionLost(Exception):
    """The stream ended or broke; the caller decides whether a resend is allowed."""


def _encode(message: Mapping[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _check_length(length: int, max_frame: int) -> None:
    if length == 0:
        raise ProtocolError("protocol_error", "the daemon sent an empty frame")
    if length > max_frame:
        raise FrameTooLargeError(
            "frame_too_large",
            f"the daemon sent a frame of {length} bytes, over the client's limit of "
            f"{max_frame} (raise max_frame)",
            {"limit": max_frame},
        )


def _decode(body: bytes | bytearray) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("protocol_error", f"the daemon sent invalid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(
            "protocol_error", f"the daemon sent a {type(message).__name__}, not a map"
        )
    return message


def _result(response: dict[str, Any]) -> dict[str, Any]:
    if response.get("ok") is not True:
        raise _error_from_map(response.get("error"))
    return {k: v for k, v in response.items() if k not in ("id", "ok")}


def _request_map(request_id: int, op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    if "id" in args:
        raise TypeError("'id' is chosen by the client and cannot be passed as an argument")
    return {**args, "id": request_id, "op": op}


def _wait_limit(default: float | None, args: Mapping[str, Any]) -> float | None:
    """How long to wait for a response: a daemon-side timeout may be longer than ours."""
    daemon_timeout = args.get("timeout")
    if isinstance(daemon_timeout, int | float) and not isinstance(daemon_timeout, bool):
        return float(daemon_timeout) + _TIMEOUT_GRACE
    return default


def _embed_args(
    texts: str | Sequence[str],
    model: str,
    normalize: bool,
    truncate: bool,
    dimensions: int | None,
    prompt: str | None,
    timeout: float | None,
    priority: str | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "input": texts if isinstance(texts, str) else list(texts),
        "model": model,
        "normalize": normalize,
        "truncate": truncate,
        "encoding": "f32",
    }
    if dimensions is not None:
        args["dimensions"] = dimensions
    if prompt is not None:
        args["prompt"] = prompt
    if timeout is not None:
        args["timeout"] = timeout
    if priority is not None:
        args["priority"] = priority
    if not cache:
        args["cache"] = False
    return args


def _decode_vectors(result: Mapping[str, Any], single: bool) -> Vectors:
    count, dim, data = result.get("count"), result.get("dim"), result.get("embeddings")
    if not isinstance(count, int) or not isinstance(dim, int) or not isinstance(data, bytes):
        raise ProtocolError("protocol_error", "embed result lacks count, dim or f32 embeddings")
    if len(data) != count * dim * 4:
        raise ProtocolError(
            "protocol_error",
            f"embed result has {len(data)} bytes, expected {count} x {dim} x 4",
        )
    # astype copies: the array is writable, native-endian and does not pin the frame's bytes.
    vectors = np.frombuffer(data, "<f4").reshape(count, dim).astype(np.float32)
    return vectors[0] if single else vectors


def _tokenize_args(texts: str | Sequence[str], model: str, prompt: str | None) -> dict[str, Any]:
    args: dict[str, Any] = {"input": texts if isinstance(texts, str) else list(texts)}
    args["model"] = model
    if prompt is not None:
        args["prompt"] = prompt
    return args


def _token_ids(result: Mapping[str, Any]) -> list[list[int]]:
    ids = result.get("ids")
    if not isinstance(ids, list):
        raise ProtocolError("protocol_error", "tokenize result lacks ids")
    return ids


def _resolve(path: PathArg | None) -> Path:
    return Path(path) if path is not None else default_socket_path()


# --------------------------------------------------------------------------------------------
# Transport: a Unix socket, or on Windows the named pipe \\.\pipe\embedd-<user>


def _pipe_name(path: Path) -> str:
    """On Windows: `path` if it names a pipe, else the daemon's default pipe for this user."""
    import getpass

    text = str(path)
    if text.startswith("\\\\.\\pipe\\"):
        return text
    return f"\\\\.\\pipe\\embedd-{getpass.getuser()}"


async def _open_stream(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if sys.platform == "win32":  # NOT TESTED ON WINDOWS (see the README)
        loop = asyncio.get_running_loop()
        if not isinstance(loop, asyncio.ProactorEventLoop):
            raise OSError("named pipes need asyncio's ProactorEventLoop (the Windows default)")
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.create_pipe_connection(lambda: protocol, _pipe_name(path))
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
    return await asyncio.open_unix_connection(str(path))


class _PipeStream:
    """The blocking client's view of a named pipe: the four socket methods it uses.

    Pipe reads cannot time out here: `settimeout` is accepted and ignored.
    """

    def __init__(self, name: str) -> None:
        self._file = open(name, "r+b", buffering=0)  # noqa: SIM115 - closed by close()

    def settimeout(self, timeout: float | None) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._file.write(view)
            view = view[n or 0 :]

    def recv_into(self, buffer: memoryview) -> int:
        return self._file.readinto(buffer) or 0

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------------------------
# Blocking client


class Client:
    """A blocking client holding one connection, opened on first use.

    If the daemon restarts between two calls, the next call notices the dead connection,
    reconnects and resends once, so long-lived clients survive `systemctl restart`.
    Not thread-safe: give each thread its own client (connections are cheap).
    """

    def __init__(
        self,
        path: PathArg | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
    ):
        self.path = _resolve(path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._sock: socket.socket | None = None
        # Whether the current connection has delivered a response: only then does a broken
        # connection mean "the daemon went away since", which is worth one resend.
        self._worked = False
        self._ids: Iterator[int] = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        sock, self._sock = self._sock, None
        self._worked = False
        if sock is not None:
            sock.close()

    # -- low level --------------------------------------------------------------------------

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result (the response without `id` and `ok`)."""
        return _result(self._call(op, args, retry=True))

    def _call(self, op: str, args: Mapping[str, Any], *, retry: bool) -> dict[str, Any]:
        wait = _wait_limit(self.timeout, args)
        for attempt in (1, 2):
            fresh = self._sock is None
            sock = self._connect() if self._sock is None else self._sock
            may_resend = retry and attempt == 1 and not fresh and self._worked
            request_id = next(self._ids)
            try:
                frame = _encode(_request_map(request_id, op, args))
                response = self._exchange(sock, frame, request_id, wait)
            except _ConnectionLost as exc:
                self.close()
                if may_resend:
                    continue
                raise _unavailable(self.path, "lost the connection to", str(exc)) from None
            except BaseException:
                # Whatever happened (our timeout, a bad frame, KeyboardInterrupt), the stream
                # may stop mid-frame: it cannot be reused.
                self.close()
                raise
            self._worked = True
            if response.get("id") is None:
                # frame_too_large / protocol_error / forbidden: the daemon closes the stream.
                self.close()
            return response
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        if sys.platform == "win32":  # NOT TESTED ON WINDOWS (see the README)
            try:
                pipe = _PipeStream(_pipe_name(self.path))
            except OSError as exc:
                raise _unavailable(self.path, "cannot connect to", exc) from None
            # Duck-typed: this client only calls settimeout/sendall/recv_into/close.
            self._sock = cast(socket.socket, pipe)
            self._worked = False
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _unavailable(self.path, "cannot connect to", exc) from None
        self._sock = sock
        self._worked = False
        return sock

    def _exchange(
        self, sock: socket.socket, frame: bytes, request_id: int, wait: float | None
    ) -> dict[str, Any]:
        deadline = None if wait is None else time.monotonic() + wait
        try:
            self._settimeout(sock, deadline, wait)
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # The daemon may have refused the frame (too large) and closed: its error frame
            # can still be waiting in our receive buffer, and says more than EPIPE.
            try:
                return self._read_response(sock, request_id, time.monotonic() + 0.5, 0.5)
            except (_ConnectionLost, RequestTimeoutError):
                raise _ConnectionLost(str(exc) or type(exc).__name__) from None
        except TimeoutError:
            raise _client_timeout(wait) from None
        return self._read_response(sock, request_id, deadline, wait)

    def _read_response(
        self, sock: socket.socket, request_id: int, deadline: float | None, wait: float | None
    ) -> dict[str, Any]:
        while True:
            header = self._recv(sock, _HEADER.size, deadline, wait)
            (length,) = _HEADER.unpack(header)
            _check_length(length, self.max_frame)
            message = _decode(self._recv(sock, length, deadline, wait))
            got = message.get("id")
            if got == request_id or (got is None and message.get("ok") is False):
                return message
            # A late answer to a request we no longer wait for: skip it.

    def _recv(
        self, sock: socket.socket, n: int, deadline: float | None, wait: float | None
    ) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                self._settimeout(sock, deadline, wait)
                k = sock.recv_into(view[got:])
                if k == 0:
                    raise _ConnectionLost("the daemon closed the connection")
                got += k
        except TimeoutError:
            raise _client_timeout(wait) from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _ConnectionLost(str(exc) or type(exc).__name__) from None
        finally:
            view.release()
        return buf

    @staticmethod
    def _settimeout(sock: socket.socket, deadline: float | None, wait: float | None) -> None:
        if deadline is None:
            sock.settimeout(None)
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _client_timeout(wait)
        sock.settimeout(remaining)

    # -- operations -------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return self.request("hello")

    def health(self) -> dict[str, Any]:
        return self.request("health")

    def models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = self.request("models")["models"]
        return models

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def load(self, model: str = "default") -> dict[str, Any]:
        return self.request("load", model=model)

    def unload(self, model: str = "default") -> dict[str, Any]:
        return self.request("unload", model=model)

    def shutdown(self) -> None:
        """Ask the daemon to drain and exit (refused with ForbiddenError unless allowed)."""
        # Never resent: a second shutdown could stop a daemon that was restarted meanwhile.
        _result(self._call("shutdown", {}, retry=False))

    def tokenize(
        self, texts: str | Sequence[str], model: str = "default", prompt: str | None = None
    ) -> list[list[int]]:
        """Token ids per input, special tokens included (one list per input, even for a str).

        Useful to check inputs against `max_tokens` before embedding them.
        """
        result = self.request("tokenize", **_tokenize_args(texts, model, prompt))
        return _token_ids(result)

    def embed(
        self,
        texts: str | Sequence[str],
        model: str = "default",
        *,
        normalize: bool = True,
        truncate: bool = False,
        dimensions: int | None = None,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: str | None = None,
        cache: bool = True,
    ) -> Vectors:
        """Vectors of shape (n, dim), or (dim,) for a single str.

        `timeout` is the daemon-side limit (default: the daemon's `request_timeout`); we wait
        a little longer than that ourselves.
        """
        args = _embed_args(
            texts, model, normalize, truncate, dimensions, prompt, timeout, priority, cache
        )
        return _decode_vectors(self.request("embed", **args), isinstance(texts, str))


# --------------------------------------------------------------------------------------------
# asyncio client


class _AsyncConnection:
    """One stream plus the task that routes its responses to the waiting futures."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: Path,
        max_frame: int,
    ):
        self.reader = reader
        self.writer = writer
        self.path = path
        self.max_frame = max_frame
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.worked = False
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        # Builds the exception for each request in flight once the stream ends: one instance
        # per waiter, so that their tracebacks do not pile up on a shared object.
        fail: Callable[[], EmbeddError] = functools.partial(
            _unavailable, self.path, "lost the connection to", "the daemon closed the connection"
        )
        try:
            while True:
                header = await self.reader.readexactly(_HEADER.size)
                (length,) = _HEADER.unpack(header)
                _check_length(length, self.max_frame)
                message = _decode(await self.reader.readexactly(length))
                request_id = message.get("id")
                if not isinstance(request_id, int):
                    # The daemon refused the stream itself and closes it: every request in
                    # flight is lost, for the reason it gives.
                    fail = functools.partial(_error_from_map, message.get("error"))
                    return
                self.worked = True
                future = self.pending.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(message)
        except asyncio.CancelledError:
            fail = functools.partial(
                _unavailable, self.path, "closed the connection to", "the client was closed"
            )
            raise
        except EmbeddError as exc:
            # A bad frame from the daemon: the stream is out of step and must be dropped.
            fail = functools.partial(_error_from_map, exc.details)
        except asyncio.IncompleteReadError:
            pass
        except OSError as exc:
            fail = functools.partial(
                _unavailable, self.path, "lost the connection to", str(exc) or type(exc).__name__
            )
        finally:
            self.closed = True
            self.writer.close()
            pending, self.pending = self.pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(fail())

    @property
    def alive(self) -> bool:
        return not self.closed and not self.writer.is_closing()

    def abort(self) -> None:
        """Stop using the stream now, before the reader task has noticed it is dead."""
        self.closed = True
        self.writer.close()

    def send(self, frame: bytes) -> None:
        if not self.alive:
            raise _ConnectionLost("the connection is closed")
        self.writer.write(frame)

    async def drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise _ConnectionLost(str(exc) or type(exc).__name__) from None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class AsyncClient:
    """An asyncio client: many tasks may share it, their requests pipelined on one connection.

    Responses come back in any order and are routed by id, so a slow batch never holds up a
    quick `health`. If the connection drops, the requests in flight fail with
    DaemonUnavailableError and the next call reconnects.
    """

    def __init__(
        self,
        path: PathArg | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
    ):
        self.path = _resolve(path)
        self.timeout = timeout
        self.max_frame = max_frame
        self._conn: _AsyncConnection | None = None
        self._connecting: asyncio.Lock | None = None
        self._ids: Iterator[int] = itertools.count(1)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; requests still in flight fail with DaemonUnavailableError."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> tuple[_AsyncConnection, bool]:
        """The live connection, opened if needed; the flag says whether it was just opened."""
        conn = self._conn
        if conn is not None and conn.alive:
            return conn, False
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            conn = self._conn
            if conn is not None and conn.alive:
                return conn, False
            try:
                reader, writer = await asyncio.wait_for(_open_stream(self.path), self.timeout)
            except TimeoutError:
                raise _unavailable(self.path, "cannot connect to", "timed out") from None
            except OSError as exc:
                raise _unavailable(self.path, "cannot connect to", exc) from None
            conn = _AsyncConnection(reader, writer, self.path, self.max_frame)
            self._conn = conn
            return conn, True

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request and return its result (the response without `id` and `ok`)."""
        return _result(await self._call(op, args, retry=True))

    async def _call(self, op: str, args: Mapping[str, Any], *, retry: bool) -> dict[str, Any]:
        wait = _wait_limit(self.timeout, args)
        for attempt in (1, 2):
            conn, fresh = await self._connection()
            may_resend = retry and attempt == 1 and not fresh and conn.worked
            request_id = next(self._ids)
            frame = _encode(_request_map(request_id, op, args))
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            conn.pending[request_id] = future
            try:
                conn.send(frame)
                await conn.drain()
            except _ConnectionLost as exc:
                # Failed while sending: the request never reached the daemon, so resending
                # cannot run it twice.
                conn.pending.pop(request_id, None)
                conn.abort()
                if future.done() and not future.cancelled():
                    future.exception()  # already failed by the reader: mark it retrieved
                if may_resend:
                    continue
                raise _unavailable(self.path, "lost the connection to", str(exc)) from None
            except BaseException:
                conn.pending.pop(request_id, None)
                future.cancel()
                raise
            return await self._await(conn, request_id, future, wait)
        raise AssertionError("unreachable")

    async def _await(
        self,
        conn: _AsyncConnection,
        request_id: int,
        future: asyncio.Future[dict[str, Any]],
        wait: float | None,
    ) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(future, wait)
        except TimeoutError:
            self._abandon(conn, request_id)
            raise _client_timeout(wait) from None
        except asyncio.CancelledError:
            self._abandon(conn, request_id)
            raise

    def _abandon(self, conn: _AsyncConnection, request_id: int) -> None:
        """Tell the daemon to drop work nobody waits for any more; its answer is ignored."""
        if conn.pending.pop(request_id, None) is None or conn.closed:
            return
        with contextlib.suppress(_ConnectionLost, OSError):
            conn.send(_encode({"id": next(self._ids), "op": "cancel", "target": request_id}))

    # -- operations -------------------------------------------------------------------------

    async def hello(self) -> dict[str, Any]:
        return await self.request("hello")

    async def health(self) -> dict[str, Any]:
        return await self.request("health")

    async def models(self) -> list[dict[str, Any]]:
        models: list[dict[str, Any]] = (await self.request("models"))["models"]
        return models

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")

    async def load(self, model: str = "default") -> dict[str, Any]:
        return await self.request("load", model=model)

    async def unload(self, model: str = "default") -> dict[str, Any]:
        return await self.request("unload", model=model)

    async def shutdown(self) -> None:
        """Ask the daemon to drain and exit (refused with ForbiddenError unless allowed)."""
        _result(await self._call("shutdown", {}, retry=False))

    async def tokenize(
        self, texts: str | Sequence[str], model: str = "default", prompt: str | None = None
    ) -> list[list[int]]:
        """Token ids per input, special tokens included (one list per input, even for a str).

        Useful to check inputs against `max_tokens` before embedding them.
        """
        result = await self.request("tokenize", **_tokenize_args(texts, model, prompt))
        return _token_ids(result)

    async def embed(
        self,
        texts: str | Sequence[str],
        model: str = "default",
        *,
        normalize: bool = True,
        truncate: bool = False,
        dimensions: int | None = None,
        prompt: str | None = None,
        timeout: float | None = None,
        priority: str | None = None,
        cache: bool = True,
    ) -> Vectors:
        """Vectors of shape (n, dim), or (dim,) for a single str.

        `timeout` is the daemon-side limit (default: the daemon's `request_timeout`); we wait
        a little longer than that ourselves.
        """
        args = _embed_args(
            texts, model, normalize, truncate, dimensions, prompt, timeout, priority, cache
        )
        return _decode_vectors(await self.request("embed", **args), isinstance(texts, str))
