"""Client for the embedd daemon (wire protocol version 1: PROTOCOL.md; usage: docs/client.md).

Copy this one file into your project: it needs only the standard library, msgpack and numpy,
and repeats the one rule of the daemon it needs (the default socket path) instead of importing
it. Top to bottom: errors; trust (whose daemon may get text); `_Session`, every protocol rule
with no I/O; the operations, each defined once as a `_Call`; the shells `Client` (blocking) and
`AsyncClient` (asyncio), moving bytes between a socket and a session. Tested on Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import math
import os
import reprlib
import socket
import struct
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from types import CoroutineType
from typing import Any, Concatenate, Generic, Literal, ParamSpec, Self, TypedDict, TypeVar, Unpack

import msgpack  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

__all__ = [
    "AsyncClient",
    "BusyError",
    "Client",
    "DaemonUnavailableError",
    "EmbedOptions",
    "EmbeddError",
    "InputTooLongError",
    "Ranked",
    "UntrustedDaemonError",
    "Window",
    "WindowOptions",
    "default_socket_path",
]

# Larger than the daemon's default max_response (64 MiB) so that a daemon configured for big
# answers still works, yet bounded so that a corrupt length prefix cannot make us allocate GiBs.
DEFAULT_MAX_FRAME = 1 << 30
# Seconds to wait for an answer: longer than the daemon's default request_timeout (120 s),
# so that a large request gets the daemon's own `timeout` error rather than ours.
DEFAULT_TIMEOUT = 150.0
# The daemon refuses a `timeout` above this (its MAX_TIMEOUT, reported by `hello` as
# `max_timeout`); refusing it here too keeps every wait finite (1e10 s overflowed the clock).
MAX_TIMEOUT = 3600.0
# Extra seconds we wait beyond a daemon-side `timeout`, so that the daemon's own `timeout`
# error (which says more) normally arrives before we give up ourselves.
_TIMEOUT_GRACE = 2.0
# Texts per request in `embed_documents`: small enough that a huge iterable is never held in
# memory, large enough to fill the daemon's batches (bulk batches hold ~256 tokens x 64 inputs).
DOCUMENT_BATCH = 64
# Seconds to keep reading after a send failed: the daemon's reason (`frame_too_large`) may
# still be waiting in the socket, and says more than EPIPE.
_AFTER_BROKEN_SEND = 0.5
_READ_SIZE = 256 * 1024

_HEADER = struct.Struct(">I")
# What the HTTP front answers a msgpack frame with. No frame can start so: "HTTP" as a length
# prefix is 1,213,486,160 bytes, and "/" (0x2f) does not begin a msgpack map.
_HTTP_REPLY = b"HTTP/"
_HTTP_MISTAKE = (
    "this is embedd's HTTP socket, not its msgpack socket: give the client the daemon's "
    "`socket` path (its `--socket`, or the default), or speak HTTP to this one"
)
_UCRED = struct.Struct("3i")  # Linux's struct ucred: pid, uid, gid

PathArg = str | os.PathLike[str]
Vectors = npt.NDArray[np.float32]
# `embed`'s answer: float32 rows, or with `precision` float16 rows or packed signs (int8 for
# "binary", uint8 for "ubinary", ceil(dim / 8) bytes a row, as sentence-transformers packs them).
Embeddings = npt.NDArray[Any]
_DTYPES = {"float32": "<f4", "float16": "<f2", "binary": "i1", "ubinary": "u1"}
T = TypeVar("T")
_Coroutine: typing.TypeAlias = "CoroutineType[Any, Any, T]"
P = ParamSpec("P")
# What a wait that ran out raises (our `timeout` error, or the broken send it followed).
_Raise = Callable[[], Exception]


def default_socket_path() -> Path:
    """The socket the daemon listens on when neither side names one (PROTOCOL.md, Transport)."""
    if os.environ.get("EMBEDD_SOCKET"):
        return Path(os.environ["EMBEDD_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "embedd" / "embedd.sock"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(f"/tmp/embedd-{uid}") / "embedd.sock"


# -- Errors ----------------------------------------------------------------------------------------


class EmbeddError(Exception):
    """An error the daemon answered (`code` as in PROTOCOL.md's *Errors*), or one met on the way:
    `unavailable`, `untrusted`, and `timeout`, `frame_too_large`, `protocol_error` or
    `bad_request` found by the client itself.

    Callers branch on `code`. The details the protocol defines are attributes, None where the
    error has none; `details` keeps the whole error map for anything a newer daemon adds.
    """

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = {**(details or {}), "code": code, "message": message}
        retry_after = _detail(self.details, "retry_after", int | float)
        self.retry_after: float | None = None if retry_after is None else float(retry_after)
        self.index: int | None = _detail(self.details, "index", int)
        self.limit: float | None = _detail(self.details, "limit", int | float)
        self.tokens: int | None = _detail(self.details, "tokens", int)
        self.key: str | None = _detail(self.details, "key", str)


class DaemonUnavailableError(EmbeddError):
    """Nothing answers on the socket, or the connection was lost: the daemon is not running,
    or it stopped. Code `unavailable`."""

    def __init__(self, message: str, details: Mapping[str, Any] | None = None):
        super().__init__("unavailable", message, details)


class UntrustedDaemonError(EmbeddError):
    """The socket, or the process answering on it, belongs to a user this one does not trust:
    nothing was sent. Code `untrusted`."""

    def __init__(self, message: str, details: Mapping[str, Any] | None = None):
        super().__init__("untrusted", message, details)


class BusyError(EmbeddError):
    """The daemon's queue or this connection's requests in flight are at their limit: the same
    request makes sense again after `retry_after` seconds. Code `busy`."""


class InputTooLongError(EmbeddError):
    """Input `index` has `tokens` tokens, over the model's `limit`: resend it with
    `truncate=True` or `long="split"`. Code `input_too_long`."""


_ACTED_ON: dict[str, type[EmbeddError]] = {"busy": BusyError, "input_too_long": InputTooLongError}


def _detail(details: Mapping[str, Any], key: str, kind: Any) -> Any:
    value = details.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _error_from_map(error: Any) -> EmbeddError:
    if not isinstance(error, Mapping):
        return EmbeddError("protocol_error", f"error response without an error map: {error!r}")
    code = _detail(error, "code", str) or "internal"
    message = _detail(error, "message", str) or "(no message)"
    return _ACTED_ON.get(code, EmbeddError)(code, message, error)


def _why(exc: BaseException) -> str:
    return str(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


def _unavailable(path: Path, what: str, cause: BaseException | str) -> DaemonUnavailableError:
    if not isinstance(cause, str):
        cause = (isinstance(cause, OSError) and cause.strerror) or _why(cause)
    return DaemonUnavailableError(
        f"{what} the embedd daemon at {path}: {cause}. "
        "Is it running? Start it with `embedd serve`.",
        {"path": str(path)},
    )


def _client_timeout(limit: float | None) -> EmbeddError:
    return EmbeddError("timeout", f"no response from the daemon within {limit} s", {"limit": limit})


# -- Who may answer: the client checks the daemon as the daemon checks its clients -----------------


def _trusted_uids(extra: Iterable[int | str]) -> set[int]:
    """This user, root, and whoever the caller (or $EMBEDD_TRUST_UIDS) names."""
    import pwd  # here, not at the top: the module stays importable where pwd does not exist

    names = list(extra) + [n for n in os.environ.get("EMBEDD_TRUST_UIDS", "").split(",") if n]
    uids = {os.getuid(), 0}
    for entry in names:
        if isinstance(entry, int) or str(entry).isdigit():
            uids.add(int(entry))
        else:
            try:
                uids.add(pwd.getpwnam(str(entry).strip()).pw_uid)
            except KeyError:
                raise UntrustedDaemonError(f"no user named {entry!r} to trust") from None
    return uids


def _untrusted(path: Path, whose: str, uid: int) -> UntrustedDaemonError:
    return UntrustedDaemonError(
        f"{whose} uid {uid}, not you (uid {os.getuid()}) or root; refusing to send anything "
        "there. If that user runs a daemon you trust, pass trust_uids=[...] or set "
        "EMBEDD_TRUST_UIDS.",
        {"path": str(path), "uid": uid},
    )


def _check_peer(sock: socket.socket, path: Path, trusted: set[int]) -> None:
    """After connecting: the process that answers must run as a trusted user (Linux only: on
    macOS Python cannot read the peer's uid, and only the owners are checked)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return
    uid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
    if uid not in trusted:
        raise _untrusted(path, f"the process answering on {path} runs as", uid)


# -- The session: every protocol rule, no I/O ------------------------------------------------------


class _ConnectionLost(Exception):
    """The stream ended or broke; the shell decides (with the session) whether to resend."""


@dataclass
class _Session:
    """One connection's protocol state. The shells feed it bytes and take frames from it."""

    max_frame: int
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    pending: set[int] = field(default_factory=set)  # ids sent and not answered yet
    # Whether this connection has delivered an answer: only then does a broken connection mean
    # "the daemon went away since", which makes one resend on a new connection safe to try.
    worked: bool = False
    # Set when the daemon refused the stream itself (an error frame without an id): the reason
    # every request still in flight failed. The connection cannot be used again.
    failed: EmbeddError | None = None
    _buf: bytearray = field(default_factory=bytearray)

    def request(self, op: str, args: Mapping[str, Any]) -> tuple[int, bytes]:
        if "id" in args:
            raise TypeError("'id' is chosen by the client and cannot be passed as an argument")
        rid = next(self.ids)
        frame = _encode({**args, "id": rid, "op": op})
        self.pending.add(rid)
        return rid, frame

    def abandon(self, rid: int) -> bytes | None:
        """Nobody waits for `rid` any more: the frame that asks the daemon to drop its work
        (None if it is already answered). The answer to that cancel is ignored."""
        if rid not in self.pending or self.failed is not None:
            return None
        self.pending.discard(rid)
        return _encode({"id": next(self.ids), "op": "cancel", "target": rid})

    def receive(self, data: bytes) -> list[tuple[int, dict[str, Any]]]:
        """Bytes from the daemon -> (id, response) for each complete answer we wait for. Raises
        the daemon's error when it refuses the stream (an error frame with `id: nil` closes the
        connection, PROTOCOL.md), or a `protocol_error` / `frame_too_large` on a stream that
        cannot be read: either way the connection is done for."""
        if self.failed is not None:
            raise self.failed
        self._buf += data
        out: list[tuple[int, dict[str, Any]]] = []
        while len(self._buf) >= _HEADER.size:
            if self._buf.startswith(_HTTP_REPLY[: len(self._buf)]):
                if len(self._buf) < len(_HTTP_REPLY):
                    break  # "HTTP" could still be a length prefix: the next byte decides
                raise self._fail("protocol_error", _HTTP_MISTAKE, {})
            (length,) = _HEADER.unpack_from(self._buf)
            if length == 0:
                raise self._fail("protocol_error", "the daemon sent an empty frame", {})
            if length > self.max_frame:
                raise self._fail(
                    "frame_too_large",
                    f"the daemon sent a frame of {length} bytes, over the client's limit "
                    f"of {self.max_frame} (raise max_frame)",
                    {"limit": self.max_frame},
                )
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            message = _decode(bytes(self._buf[_HEADER.size : end]))
            del self._buf[:end]
            rid = message.get("id")
            if rid is None and message.get("ok") is False:
                self.failed = _error_from_map(message.get("error"))
                raise self.failed
            if isinstance(rid, int) and rid in self.pending:
                self.pending.discard(rid)
                self.worked = True
                out.append((rid, message))
            # Otherwise: a late answer to an abandoned request, or to a cancel: skipped.
        return out

    def _fail(self, code: str, message: str, details: Mapping[str, Any]) -> EmbeddError:
        self.failed = EmbeddError(code, message, details)
        return self.failed

    def may_resend(self, *, allowed: bool, fresh: bool) -> bool:
        """After the connection broke while sending: a request that never reached the daemon
        is sent again once, on a new connection, if the old one had worked (so the daemon
        restarted in between) and the op is safe to repeat."""
        return allowed and not fresh and self.worked


def _encode(message: Mapping[str, Any]) -> bytes:
    try:
        body: bytes = msgpack.packb(message, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        # msgpack names neither the argument nor the limit (an int must fit in 64 bits, a str
        # must encode as UTF-8): find the argument, so the caller can tell which one to fix.
        key = next((k for k, v in message.items() if not _packs(v)), "input")
        value = reprlib.repr(message.get(key))
        raise EmbeddError(
            "bad_request", f"{key} = {value} cannot be sent in msgpack: {exc}", {"key": key}
        ) from None
    return _HEADER.pack(len(body)) + body


def _packs(value: Any) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (OverflowError, TypeError, ValueError):
        return False
    return True


def _decode(body: bytes) -> dict[str, Any]:
    try:
        message = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise EmbeddError("protocol_error", f"the daemon sent invalid msgpack: {exc}") from exc
    if not isinstance(message, dict):
        raise EmbeddError(
            "protocol_error", f"the daemon sent a {type(message).__name__}, not a map"
        )
    return message


# -- The operations, each defined once for both clients --------------------------------------------


class WindowOptions(TypedDict, total=False):
    """`embed_windows`' options (PROTOCOL.md, `embed`); a misspelt one fails the type check."""

    normalize: bool
    dimensions: int
    prompt: str
    timeout: float
    priority: Literal["interactive", "bulk"]
    cache: bool
    overlap: int


class EmbedOptions(WindowOptions, total=False):
    """`embed`'s options: those of `embed_windows`, and what an over-long input gets."""

    truncate: bool
    long: Literal["error", "truncate", "split"]
    pool: Literal["mean", "none"]
    precision: Literal["float32", "float16", "binary", "ubinary"]


@dataclass(frozen=True, eq=False)
class Window:
    """One window of an input (the whole input when it fits the model): a chunk for a vector
    store, with where it came from."""

    input: int  # which of the texts it is from
    span: tuple[int, int]  # its [start, end) characters in that text
    text: str  # texts[input][start:end]
    vector: Vectors


@dataclass(frozen=True)
class Ranked:
    """A document of a rerank answer: its index in the request, its score (the reranker's raw
    logit), and its text if `return_documents` asked for it."""

    index: int
    score: float
    document: str | None = None


def _ranked(result: Mapping[str, Any]) -> list[Ranked]:
    try:
        return [Ranked(r["index"], float(r["score"]), r.get("document")) for r in result["results"]]
    except (KeyError, TypeError, ValueError):
        raise EmbeddError("protocol_error", "rerank result lacks its results") from None


@dataclass(frozen=True)
class _Call(Generic[T]):
    op: str
    args: dict[str, Any]
    parse: Callable[[dict[str, Any]], T]
    # Safe to send again after the connection broke mid-send (not `shutdown`: a second one
    # could stop a daemon that was restarted meanwhile).
    resend: bool = True

    def wait(self, default: float | None) -> float | None:
        """How long to wait for the answer: a daemon-side timeout may be longer than ours."""
        timeout = self.args.get("timeout")
        return default if timeout is None else float(timeout) + _TIMEOUT_GRACE

    def answer(self, response: Mapping[str, Any]) -> T:
        if response.get("ok") is not True:
            raise _error_from_map(response.get("error"))
        return self.parse({k: v for k, v in response.items() if k not in ("id", "ok")})


def _embed(texts: str | Sequence[str], model: str, options: Mapping[str, Any]) -> _Call[Embeddings]:
    timeout = options.get("timeout")
    if timeout is not None and not (0 < timeout <= MAX_TIMEOUT and math.isfinite(timeout)):
        raise EmbeddError(
            "bad_request",
            f"timeout must be > 0 and at most {MAX_TIMEOUT:g} seconds, got {timeout}",
            {"key": "timeout", "limit": MAX_TIMEOUT},
        )
    args = {"input": _texts(texts), "model": model, "encoding": "f32", **options}
    # pool="none" answers a row per window, so even one str gets a 2-D array.
    single = isinstance(texts, str) and options.get("pool") != "none"
    return _Call("embed", args, lambda r: _vectors(r, single))


def _embed_windows(
    texts: str | Sequence[str], model: str, options: WindowOptions
) -> _Call[list[Window]]:
    inputs = [texts] if isinstance(texts, str) else list(texts)
    args = _embed(inputs, model, {**options, "long": "split", "pool": "none"}).args
    return _Call("embed", args, lambda r: _windows(r, inputs))


def _given(**args: Any) -> dict[str, Any]:
    """The arguments the caller gave: None means "the daemon's default", so it is not sent."""
    return {k: v for k, v in args.items() if v is not None}


def _texts(texts: str | Sequence[str]) -> str | list[str]:
    return texts if isinstance(texts, str) else list(texts)


def _vectors(result: Mapping[str, Any], single: bool) -> Embeddings:
    count, dim, data = result.get("count"), result.get("dim"), result.get("embeddings")
    precision = result.get("precision", "float32")
    if not isinstance(count, int) or not isinstance(dim, int) or not isinstance(data, bytes):
        raise EmbeddError("protocol_error", "embed result lacks count, dim or f32 embeddings")
    if precision not in _DTYPES:
        raise EmbeddError("protocol_error", f"embed result has an unknown precision {precision!r}")
    dtype = np.dtype(_DTYPES[precision])
    # The packed precisions hold 8 signs a byte, the last byte padded.
    width = (dim + 7) // 8 if precision in ("binary", "ubinary") else dim
    if len(data) != count * width * dtype.itemsize:
        raise EmbeddError(
            "protocol_error",
            f"embed result has {len(data)} bytes, expected {count} x {width} of {dtype}",
        )
    # astype copies: the array is writable, native-endian and does not pin the frame's bytes.
    vectors = np.frombuffer(data, dtype).reshape(count, width).astype(dtype.newbyteorder("="))
    return vectors[0] if single else vectors


def _windows(result: Mapping[str, Any], inputs: list[str]) -> list[Window]:
    vectors = _vectors(result, single=False)
    counts, spans = result.get("windows"), result.get("spans")
    if not (
        isinstance(counts, list)
        and isinstance(spans, list)
        and len(counts) == len(inputs)
        and all(isinstance(n, int) for n in counts)
        and sum(counts) == len(spans) == len(vectors)
    ):
        raise EmbeddError("protocol_error", "embed result's windows and spans do not fit it")
    owners = (i for i, n in enumerate(counts) for _ in range(n))
    return [
        Window(i, (start, end), inputs[i][start:end], vector)
        for i, (start, end), vector in zip(owners, spans, vectors, strict=True)
    ]


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


@dataclass(frozen=True)
class _Op(Generic[P, T]):
    """One operation of both clients, from the method that builds its `_Call` (whose
    parameters and docstring it keeps): `Client`'s returns the answer, `AsyncClient`'s is a
    coroutine. Each client gets a real method of its own (`_Base.__init_subclass__`), so that
    `help`, `inspect` and `iscoroutinefunction` see hand-written ones; the overloads say the
    same to a type checker."""

    build: Callable[Concatenate[Any, P], _Call[T]]

    @typing.overload
    def __get__(self, client: Client, owner: Any) -> Callable[P, T]: ...
    @typing.overload
    def __get__(self, client: AsyncClient, owner: Any) -> Callable[P, _Coroutine[T]]: ...
    def __get__(self, client: Any, owner: Any) -> Any:
        return self  # only `_Base` holds the descriptor: each client holds its method

    def method(self, asynchronous: bool) -> Callable[..., Any]:
        build = self.build

        async def coroutine(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return await client._run(build(client, *args, **kwargs))

        def blocking(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return client._run(build(client, *args, **kwargs))

        method = functools.wraps(build)(coroutine if asynchronous else blocking)
        signature = inspect.signature(build)  # returns "_Call[X]": the method returns "X"
        returns = str(signature.return_annotation).removeprefix("_Call[").removesuffix("]")
        method.__signature__ = signature.replace(return_annotation=returns)  # type: ignore[attr-defined]
        return method


# -- The shells ------------------------------------------------------------------------------------


class _Base:
    """What both clients are told: where, how long to wait, the largest frame to accept, and
    which other users' daemons to trust besides one's own and root's."""

    def __init__(
        self,
        path: PathArg | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        trust_uids: Iterable[int | str] = (),
    ) -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        self.timeout = timeout
        self.max_frame = max_frame
        self._trust = list(trust_uids)
        self._ids: Iterator[int] = itertools.count(1)
        self._new_session()

    def __init_subclass__(cls, *, asynchronous: bool = False) -> None:
        for name, op in vars(_Base).items():
            if isinstance(op, _Op):
                setattr(cls, name, op.method(asynchronous))

    def _new_session(self) -> None:
        """A new connection's protocol state (ids go on counting, so no answer is mistaken)."""
        self._session = _Session(self.max_frame, self._ids)

    def _checked_path(self) -> set[int]:
        """Before connecting: the socket's directory and file must belong to a trusted user, so
        that a socket planted in a directory another user created first gets no text."""
        if not hasattr(socket, "AF_UNIX"):
            raise DaemonUnavailableError(
                "embedd_client talks to the daemon over a Unix socket, which Python does not "
                "offer on this platform (Windows is not supported by this module)",
                {"path": str(self.path)},
            )
        trusted = _trusted_uids(self._trust)
        for what, target in (("directory", self.path.parent), ("socket", self.path)):
            try:
                owner = os.lstat(target).st_uid
            except FileNotFoundError:
                break  # nothing there: connecting fails as "unavailable"
            if owner not in trusted:
                raise _untrusted(self.path, f"the socket {what} {target} belongs to", owner)
        return trusted

    # -- the operations, each defined once by the `_Call` it sends (see `_Op`) -----------------

    @_Op
    def request(self, /, op: str, **args: Any) -> _Call[dict[str, Any]]:
        """Send one request and return its result (the response without `id` and `ok`)."""
        return _Call(op, args, dict)

    @_Op
    def hello(self) -> _Call[dict[str, Any]]:
        return _Call("hello", {}, dict)

    @_Op
    def health(self) -> _Call[dict[str, Any]]:
        return _Call("health", {}, dict)

    @_Op
    def models(self) -> _Call[list[dict[str, Any]]]:
        return _Call("models", {}, lambda r: list(r["models"]))

    @_Op
    def stats(self) -> _Call[dict[str, Any]]:
        return _Call("stats", {}, dict)

    @_Op
    def load(self, model: str = "default") -> _Call[dict[str, Any]]:
        return _Call("load", {"model": model}, dict)

    @_Op
    def unload(self, model: str = "default") -> _Call[dict[str, Any]]:
        return _Call("unload", {"model": model}, dict)

    @_Op
    def shutdown(self) -> _Call[None]:
        """Ask the daemon to drain and exit (refused with `forbidden` unless its config allows)."""
        return _Call("shutdown", {}, lambda r: None, resend=False)

    @_Op
    def tokenize(
        self, texts: str | Sequence[str], model: str = "default", prompt: str | None = None
    ) -> _Call[list[list[int]]]:
        """Token ids per input, special tokens included (one list per input, even for a str)."""
        args = _given(input=_texts(texts), model=model, prompt=prompt)
        return _Call("tokenize", args, lambda r: list(r["ids"]))

    @_Op
    def chunk(
        self, text: str, model: str = "default", max_tokens: int | None = None, overlap: int = 0
    ) -> _Call[list[dict[str, Any]]]:
        """`text` cut into chunks of at most `max_tokens` tokens (default: the model's limit)
        at paragraph, sentence or word boundaries: each with `text`, `span`, `tokens`."""
        args = _given(input=text, model=model, overlap=overlap, max_tokens=max_tokens)
        return _Call("chunk", args, lambda r: list(r["chunks"]))

    @_Op
    def embed(
        self, texts: str | Sequence[str], model: str = "default", **options: Unpack[EmbedOptions]
    ) -> _Call[Embeddings]:
        """Vectors of shape (n, dim), or (dim,) for a single str; with `pool="none"`, one row
        per window (`embed_windows` says which input and span each is). `timeout` is the
        daemon-side limit (default: its `request_timeout`); we wait a little longer ourselves.
        `precision`: float32 (default), float16, or signs packed 8 a byte ("binary": int8,
        "ubinary": uint8; rows of ceil(dim / 8))."""
        return _embed(texts, model, options)

    @_Op
    def embed_windows(
        self, texts: str | Sequence[str], model: str = "default", **options: Unpack[WindowOptions]
    ) -> _Call[list[Window]]:
        """Each input split into windows that fit the model (`overlap` tokens shared between
        neighbours), each window with its vector, span and text, in input order."""
        return _embed_windows(texts, model, options)

    @_Op
    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        model: str = "default",
        top_n: int | None = None,
        return_documents: bool = False,
    ) -> _Call[list[Ranked]]:
        """Each document scored against `query` by a reranker (a cross-encoder), best first
        (`top_n` of them); a document longer than the model's window scores as its best piece."""
        args = _given(query=query, documents=list(documents), model=model, top_n=top_n)
        return _Call("rerank", {**args, "return_documents": return_documents}, _ranked)

    @_Op
    def embed_query(
        self, text: str, model: str = "default", prompt: str | None = None
    ) -> _Call[Vectors]:
        """One query's vector, at interactive priority (`prompt`: e.g. "query", if the model
        has one configured)."""
        return _embed(text, model, _given(priority="interactive", prompt=prompt))


class Client(_Base):
    """A blocking client holding one connection, opened on first use.

    If the daemon restarts between two calls, the next call notices the dead connection,
    reconnects and resends once, so long-lived clients survive `systemctl restart`.
    Not thread-safe: give each thread its own client (connections are cheap).
    """

    _sock: socket.socket | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; a later call opens a new one."""
        sock, self._sock = self._sock, None
        self._new_session()
        if sock is not None:
            sock.close()

    def _connect(self) -> socket.socket:
        trusted = self._checked_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.path))
            _check_peer(sock, self.path, trusted)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise _unavailable(self.path, "cannot connect to", exc) from None
            raise
        return sock

    def _run(self, call: _Call[T]) -> T:
        return call.answer(self._exchange(call))

    def _exchange(self, call: _Call[Any]) -> dict[str, Any]:
        wait = call.wait(self.timeout)
        timed_out = functools.partial(_client_timeout, wait)
        for first in (True, False):
            fresh, session = self._sock is None, self._session
            sock = self._sock = self._sock or self._connect()
            rid, frame = session.request(call.op, call.args)
            deadline = None if wait is None else time.monotonic() + wait
            try:
                try:
                    self._settimeout(sock, deadline, timed_out)
                    sock.sendall(frame)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    # The daemon's reason may still be waiting (see _AFTER_BROKEN_SEND).
                    why = _why(exc)
                    late = time.monotonic() + _AFTER_BROKEN_SEND
                    with contextlib.suppress(_ConnectionLost):
                        return self._read(sock, rid, late, functools.partial(_ConnectionLost, why))
                    raise _ConnectionLost(why) from None
                except TimeoutError:
                    raise timed_out() from None
                return self._read(sock, rid, deadline, timed_out)
            except _ConnectionLost as exc:
                self.close()
                if not session.may_resend(allowed=call.resend and first, fresh=fresh):
                    raise _unavailable(self.path, "lost the connection to", str(exc)) from None
            except BaseException:
                # Whatever happened (our timeout, a refused stream, KeyboardInterrupt), the
                # stream may stop mid-frame: it cannot be reused.
                self.close()
                raise
        raise AssertionError("unreachable")

    def _read(
        self, sock: socket.socket, rid: int, deadline: float | None, timed_out: _Raise
    ) -> dict[str, Any]:
        while True:
            try:
                self._settimeout(sock, deadline, timed_out)
                data = sock.recv(_READ_SIZE)
            except TimeoutError:
                raise timed_out() from None
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise _ConnectionLost(_why(exc)) from None
            if not data:
                raise _ConnectionLost("the daemon closed the connection")
            for got, message in self._session.receive(data):
                if got == rid:
                    return message

    @staticmethod
    def _settimeout(sock: socket.socket, deadline: float | None, timed_out: _Raise) -> None:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise timed_out()
        sock.settimeout(remaining)

    def embed_documents(
        self,
        texts: Iterable[str],
        model: str = "default",
        *,
        batch_size: int = DOCUMENT_BATCH,
        **options: Unpack[EmbedOptions],
    ) -> Iterator[Embeddings]:
        """Vectors of any number of texts, at bulk priority, yielded `batch_size` at a time
        (shape (k, dim)), so a large folder is never held in memory at once."""
        options.setdefault("priority", "bulk")
        for batch in _batches(texts, batch_size):
            yield self._run(_embed(batch, model, options))


@dataclass(eq=False)
class _AsyncConnection:
    """One stream, its session, and the task that routes answers to the waiting futures."""

    reader: InitVar[asyncio.StreamReader]
    writer: asyncio.StreamWriter
    path: InitVar[Path]
    session: _Session
    waiting: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    closed: bool = False

    def __post_init__(self, reader: asyncio.StreamReader, path: Path) -> None:
        self.task = asyncio.get_running_loop().create_task(self._read_loop(reader, path))

    async def _read_loop(self, reader: asyncio.StreamReader, path: Path) -> None:
        what, reason, refused = "lost the connection to", "the daemon closed the connection", None
        try:
            while data := await reader.read(_READ_SIZE):
                for rid, message in self.session.receive(data):
                    future = self.waiting.pop(rid, None)
                    if future is not None and not future.done():
                        future.set_result(message)
        except asyncio.CancelledError:
            what, reason = "closed the connection to", "the client was closed"
            raise
        except EmbeddError as exc:
            refused = exc.details  # the daemon refused the stream, or sent one we cannot read
        except OSError as exc:
            reason = _why(exc)
        finally:
            self.abort()
            waiting, self.waiting = self.waiting, {}
            for future in waiting.values():
                if not future.done():
                    # A fresh error each, so that their tracebacks do not pile up on one object.
                    fail = _unavailable(path, what, reason) if refused is None else None
                    future.set_exception(fail or _error_from_map(refused))

    @property
    def alive(self) -> bool:
        return not self.closed and not self.writer.is_closing()

    def abandon(self, rid: int) -> None:
        self.waiting.pop(rid, None)
        frame = self.session.abandon(rid)
        if frame is not None and self.alive:
            self.writer.write(frame)

    def abort(self) -> None:
        self.closed = True
        self.writer.close()

    async def send(self, frame: bytes) -> None:
        if not self.alive:
            raise _ConnectionLost("the connection is closed")
        try:
            self.writer.write(frame)
            await self.writer.drain()
        except OSError as exc:
            raise _ConnectionLost(_why(exc)) from None

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class AsyncClient(_Base, asynchronous=True):
    """An asyncio client with `Client`'s methods as coroutines: many tasks may share it, their
    requests pipelined on one connection.

    Responses come back in any order and are routed by id, so a slow batch never holds up a
    quick `health`. A task cancelled while waiting cancels its request on the daemon. If the
    connection drops, the requests in flight fail with DaemonUnavailableError and the next
    call reconnects.
    """

    _conn: _AsyncConnection | None = None
    _connecting: asyncio.Lock | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; requests still in flight fail with DaemonUnavailableError."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _connection(self) -> tuple[_AsyncConnection, bool]:
        """The live connection, opened if needed; the flag says whether it was just opened."""
        self._connecting = self._connecting or asyncio.Lock()
        async with self._connecting:
            if self._conn is not None and self._conn.alive:
                return self._conn, False
            trusted = self._checked_path()
            try:
                opening = asyncio.open_unix_connection(str(self.path))
                reader, writer = await asyncio.wait_for(opening, self.timeout)
            except OSError as exc:  # TimeoutError included
                raise _unavailable(self.path, "cannot connect to", exc) from None
            try:
                _check_peer(writer.get_extra_info("socket"), self.path, trusted)
            except BaseException:
                writer.close()
                raise
            self._new_session()
            self._conn = _AsyncConnection(reader, writer, self.path, self._session)
            return self._conn, True

    async def _run(self, call: _Call[T]) -> T:
        return call.answer(await self._exchange(call))

    async def _exchange(self, call: _Call[Any]) -> dict[str, Any]:
        wait = call.wait(self.timeout)
        for first in (True, False):
            conn, fresh = await self._connection()
            rid, frame = conn.session.request(call.op, call.args)
            conn.waiting[rid] = future = asyncio.get_running_loop().create_future()
            try:
                await conn.send(frame)
            except BaseException as exc:
                conn.waiting.pop(rid, None)
                if not isinstance(exc, _ConnectionLost):
                    future.cancel()
                    raise
                # Failed while sending: the request never reached the daemon, so resending
                # cannot run it twice.
                conn.abort()
                if future.done() and not future.cancelled():
                    future.exception()  # already failed by the reader: mark it retrieved
                if not conn.session.may_resend(allowed=call.resend and first, fresh=fresh):
                    raise _unavailable(self.path, "lost the connection to", str(exc)) from None
                continue
            try:
                return await asyncio.wait_for(future, wait)
            except TimeoutError:
                conn.abandon(rid)
                raise _client_timeout(wait) from None
            except asyncio.CancelledError:
                conn.abandon(rid)
                raise
        raise AssertionError("unreachable")

    async def embed_documents(
        self,
        texts: Iterable[str],
        model: str = "default",
        *,
        batch_size: int = DOCUMENT_BATCH,
        **options: Unpack[EmbedOptions],
    ) -> AsyncIterator[Embeddings]:
        options.setdefault("priority", "bulk")
        for batch in _batches(texts, batch_size):
            yield await self._run(_embed(batch, model, options))
