"""HTTP/1.1 as a pure object: bytes in, events (a head, then its request, or one fatal error)
out; responses to bytes.

Only what an embedding API needs and nothing the standard library's http.server would let
through unbounded: a request line and headers within `MAX_HEAD` bytes and `MAX_HEADERS`
fields, bodies by `Content-Length` or chunked up to the daemon's `max_frame`, keep-alive by
default (HTTP/1.1) unless `Connection: close`. Anything malformed yields one `HttpError` and
the parser closes: after a broken message the stream cannot be trusted.

`next_event` reports a request's head (`HttpHead`) as soon as it is complete, before any of
its body is parsed, so the conversation can refuse it (a wrong API key) before buffering the
body; it parses only when asked, so bytes of pipelined requests stay bytes until their turn.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

# Request line plus headers. 16 KiB is what most servers allow (nginx's default large header
# buffer is 8 KiB per line); an embedding request's headers are a few hundred bytes.
MAX_HEAD = 16 * 1024
# Header fields per request (Apache's LimitRequestFields default is 100).
MAX_HEADERS = 100
# The longest chunk-size line of a chunked body (hex digits plus extensions).
_MAX_CHUNK_LINE = 1024
# RFC 9112 7.1: chunk-size = 1*HEXDIG. Python's int(x, 16) also takes "0x1c", "+1c", "1_0" and
# "-0", which other parsers on the path read differently (request smuggling). 16 digits hold
# any size a 64-bit length can.
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


@dataclass(frozen=True)
class HttpHead:
    """A request's line and headers, complete; its body (if any) is still to come."""

    method: str
    target: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class HttpError:
    status: HTTPStatus
    message: str


def _fail(status: HTTPStatus, message: str) -> HttpError:
    return HttpError(status, message)


@dataclass
class HttpParser:
    max_body: int
    closed: bool = False
    _buf: bytearray = field(default_factory=bytearray)
    # The head of a request whose body is still arriving (reported once by next_event).
    _head: HttpHead | None = None
    _head_reported: bool = False
    _length: int | None = None  # Content-Length body
    _chunks: bytearray | None = None  # chunked body so far

    @property
    def buffered(self) -> int:
        return len(self._buf) + (len(self._chunks) if self._chunks is not None else 0)

    @property
    def mid_request(self) -> bool:
        return self._head is not None or bool(self._buf)

    def receive(self, data: bytes) -> None:
        """Bytes from the peer, parsed only by `next_event`."""
        if not self.closed:
            self._buf += data

    def next_event(self) -> HttpHead | HttpRequest | HttpError | None:
        """The next event the bytes so far hold (None: more bytes are needed)."""
        if self.closed:
            return None
        event = self._next()
        if isinstance(event, HttpError):
            self.closed = True
            self._buf.clear()
            self._chunks = None
        return event

    def _next(self) -> HttpHead | HttpRequest | HttpError | None:
        if self._head is not None and not self._head_reported:
            self._head_reported = True
            return self._head
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    return _fail(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too large")
                return None
            if end > MAX_HEAD:
                return _fail(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too large")
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            parsed = self._parse_head(head)
            if isinstance(parsed, HttpError):
                return parsed
            self._head_reported = True
            return self._head
        return self._body()

    def _parse_head(self, head: bytes) -> HttpError | None:
        try:
            text = head.decode("latin-1")
        except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
            return _fail(HTTPStatus.BAD_REQUEST, "undecodable head")
        lines = text.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            return _fail(HTTPStatus.BAD_REQUEST, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            return _fail(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, f"unsupported {version[:20]}")
        if len(lines) - 1 > MAX_HEADERS:
            return _fail(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"more than {MAX_HEADERS} headers"
            )
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or not name.isascii():
                return _fail(HTTPStatus.BAD_REQUEST, "malformed header line")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (
            version == "HTTP/1.1" or "keep-alive" in connection
        )
        encoding = headers.get("transfer-encoding", "").lower()
        if encoding and encoding != "chunked":
            return _fail(HTTPStatus.NOT_IMPLEMENTED, f"transfer-encoding {encoding[:40]}")
        if encoding and "content-length" in headers:
            return _fail(HTTPStatus.BAD_REQUEST, "both content-length and transfer-encoding")
        if encoding:
            self._chunks = bytearray()
        else:
            raw = headers.get("content-length", "0")
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
                return _fail(HTTPStatus.BAD_REQUEST, "bad content-length")
            length = int(raw)
            if length > self.max_body:
                return _fail(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"body of {length} bytes exceeds the limit of {self.max_body}",
                )
            self._length = length
        self._head = HttpHead(method.upper(), target, headers, keep_alive)
        self._head_reported = False
        return None

    def _body(self) -> HttpRequest | HttpError | None:
        assert self._head is not None
        if self._chunks is not None:
            return self._chunked()
        assert self._length is not None
        if len(self._buf) < self._length:
            return None
        body = bytes(self._buf[: self._length])
        del self._buf[: self._length]
        return self._done(body)

    def _chunked(self) -> HttpRequest | HttpError | None:
        assert self._chunks is not None
        while True:
            end = self._buf.find(b"\r\n")
            if end < 0:
                if len(self._buf) > _MAX_CHUNK_LINE:
                    return _fail(HTTPStatus.BAD_REQUEST, "chunk size line too long")
                return None
            # Whitespace may precede an extension's ";" (RFC 9112's BWS), never the digits.
            size_text = bytes(self._buf[:end]).split(b";", 1)[0].rstrip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_text):
                return _fail(HTTPStatus.BAD_REQUEST, "bad chunk size (hex digits only)")
            size = int(size_text, 16)
            if len(self._chunks) + size > self.max_body:
                limit = self.max_body
                return _fail(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body exceeds the limit of {limit}"
                )
            if size == 0:
                # The last chunk, then (no trailers supported) the final CRLF.
                if len(self._buf) < end + 4:
                    return None
                if self._buf[end + 2 : end + 4] != b"\r\n":
                    return _fail(HTTPStatus.BAD_REQUEST, "trailers are not supported")
                del self._buf[: end + 4]
                body = bytes(self._chunks)
                return self._done(body)
            if len(self._buf) < end + 2 + size + 2:
                return None
            if self._buf[end + 2 + size : end + 4 + size] != b"\r\n":
                return _fail(HTTPStatus.BAD_REQUEST, "chunk not terminated by CRLF")
            self._chunks += self._buf[end + 2 : end + 2 + size]
            del self._buf[: end + 4 + size]

    def _done(self, body: bytes) -> HttpRequest:
        assert self._head is not None
        head = self._head
        self._head = None
        self._length = None
        self._chunks = None
        return HttpRequest(head.method, head.target, head.headers, body, head.keep_alive)


def encode_head(
    status: HTTPStatus | int,
    length: int,
    *,
    content_type: str = "application/json",
    keep_alive: bool = True,
    extra: dict[str, str] | None = None,
) -> bytes:
    """A response's status line and headers, for a body of `length` bytes."""
    status = HTTPStatus(status)
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(length),
        "Connection": "keep-alive" if keep_alive else "close",
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()
    )
    return head.encode("latin-1") + b"\r\n"


def json_body(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
