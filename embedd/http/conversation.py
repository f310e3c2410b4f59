"""One HTTP connection's rules as a pure object: bytes in, actions out; answers to bytes.

The HTTP twin of `wire/conversation.py`, driven by the same shell (`transport/shell.py`), which
owns what both protocols share (the door, deadlines, backpressure, close, drain). This owns what
is HTTP's own:
- which route a request names, and whether it needs the API key;
- the key, checked on the head, before any of the body is parsed: a request without it is
  answered 401 at once and the connection closed, so a body nobody asked for is never buffered;
  the requests that need no key (the health probe, CORS preflights) take no body at all, so
  a keyless caller can make the daemon buffer nothing;
- one request in flight: while it is answered, further bytes are read only up to
  `PIPELINE_BUFFER` and stay unparsed, so pipelined requests wait in the kernel, not in memory;
- keep-alive, `Connection: close`, and what a malformed request, a stalled one, a half-close
  and the daemon's drain each get, every request answered exactly once (or the connection
  closed after an error answer).
Nothing here does I/O or knows about asyncio, so the tests drive it with bytes alone.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ..transport.counters import Tally
from ..wire.conversation import CancelTask, Close, Send
from ..wire.errors import EmbeddError
from . import api as http_api
from .api import Response
from .parser import (
    MAX_HEAD,
    HttpError,
    HttpHead,
    HttpParser,
    HttpRequest,
    encode_head,
    json_body,
)

# Bytes of pipelined requests taken in while one is answered: enough to notice that the client
# closed the connection (its work is then cancelled), far too little to hold many requests.
# One head's worth; the shell's read size adds at most one read on top.
PIPELINE_BUFFER = MAX_HEAD

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class Route:
    """An endpoint: its name (the server runs the coroutine of that name), the API whose error
    shape its errors take, and whether TCP callers need the key."""

    name: str
    errors: Callable[[EmbeddError], Response] = http_api.openai_error
    authenticated: bool = True


# text-embeddings-inference's routes (TEI serves its embed at `/` too, where huggingface_hub's
# InferenceClient posts), and embedd's own chunk and tokenize ops.
TEI_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/embed"): Route("tei_embed", http_api.tei_error),
    ("POST", "/"): Route("tei_embed", http_api.tei_error),
    ("GET", "/info"): Route("tei_info", http_api.tei_error),
    ("POST", "/tokenize"): Route("tei_tokenize", http_api.tei_error),
    ("POST", "/rerank"): Route("tei_rerank", http_api.tei_error),
}
OPS_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/v1/chunk"): Route("embedd_chunk"),
    ("POST", "/v1/tokenize"): Route("embedd_tokenize"),
}

ROUTES: dict[tuple[str, str], Route] = {
    **TEI_ROUTES,
    **OPS_ROUTES,
    ("POST", "/v1/embeddings"): Route("openai_embeddings"),
    ("GET", "/v1/models"): Route("openai_models"),
    ("POST", "/api/embed"): Route("ollama_embed", http_api.ollama_error),
    ("POST", "/api/embeddings"): Route("ollama_legacy", http_api.ollama_error),
    ("GET", "/api/tags"): Route("ollama_tags", http_api.ollama_error),
    ("GET", "/api/ps"): Route("ollama_ps", http_api.ollama_error),
    ("GET", "/api/version"): Route("ollama_version", http_api.ollama_error),
    # Rerank: llama-server's route (Jina's and Cohere's v1 shape) and Cohere's v2 (TEI's is
    # among TEI_ROUTES).
    ("POST", "/v1/rerank"): Route("rerank"),
    ("POST", "/v2/rerank"): Route("rerank"),
    # Probes from a service manager or a load balancer need no key.
    ("GET", "/health"): Route("health", authenticated=False),
    ("GET", "/metrics"): Route("metrics"),
}


@dataclass(frozen=True)
class RunEndpoint:
    """Run this request's endpoint; the shell reports its end (a `Response` or an
    `EmbeddError`) with `finish(rid, ...)`."""

    rid: int
    route: Route
    request: HttpRequest


Action = RunEndpoint | Send | CancelTask | Close


@dataclass(frozen=True)
class HttpLimits:
    max_body: int
    # The bearer key this connection must present (None: no key, as on the Unix socket, whose
    # peers are checked by their credentials at the door).
    api_key: str | None = None
    # Web origins whose pages may call this API from a browser (config `cors_origins`; "*" for
    # any). None by default: a page the user visits must not reach a local daemon.
    cors_origins: tuple[str, ...] = ()


# How long a browser may cache a preflight's answer (seconds): ten minutes, as many APIs do.
_CORS_MAX_AGE = 600


_UNAUTHORIZED = (
    "missing or wrong API key: send Authorization: Bearer KEY (the key is in the daemon's "
    "api_key_file; Ollama clients: OLLAMA_API_KEY=KEY)"
)


def unauthorized(path: str) -> Response:
    """401 in the shape the path's API uses: Ollama's clients show `error` as a string (an
    OpenAI-shaped object came out as "[object Object]" in ollama-js)."""
    body: dict[str, Any] = (
        {"error": _UNAUTHORIZED}
        if path.startswith("/api/")
        else {"error": {"message": _UNAUTHORIZED, "type": "authentication_error"}}
    )
    return Response(HTTPStatus.UNAUTHORIZED, body, {"WWW-Authenticate": "Bearer"})


# A body larger than this goes out as its own Send rather than copied behind its head: an
# answer of max_response (64 MiB) would otherwise exist twice at once.
_SEPARATE_BODY = 64 * 1024


def encode(response: Response, *, keep_alive: bool) -> list[bytes | bytearray]:
    """A response's bytes, as one piece or as head and body; its body is JSON unless it is
    bytes already (encoded off the loop, or another content type)."""
    headers = dict(response.headers)
    content_type = headers.pop("Content-Type", "application/json")
    raw = response.body
    body = raw if isinstance(raw, bytes | bytearray) else json_body(raw)
    head = encode_head(
        response.status, len(body), content_type=content_type, keep_alive=keep_alive, extra=headers
    )
    return [head + body] if len(body) <= _SEPARATE_BODY else [head, body]


def refusal(error: EmbeddError) -> bytes:
    """The one response to a connection refused at the door (busy, forbidden, draining)."""
    status = http_api.status_of(error)
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        # Too many connections is the server's state, not this client's rate (RFC 9110 15.6.4).
        status = HTTPStatus.SERVICE_UNAVAILABLE
    response = http_api.openai_error(error)
    return b"".join(encode(Response(status, response.body, response.headers), keep_alive=False))


class HttpConversation:
    def __init__(self, limits: HttpLimits, tally: Tally | None = None) -> None:
        self.limits = limits
        # Every response is counted here, as the msgpack conversation counts its answers, so
        # `stats.requests` covers both fronts.
        self.tally = tally if tally is not None else Tally()
        self._parser = HttpParser(max_body=limits.max_body)
        self._current: tuple[int, HttpRequest, Route] | None = None
        self._next_rid = 1
        self._frames = 0
        # No more bytes will be fed (the peer stopped sending, or we stopped reading).
        self.reading_done = False
        # No more requests will be taken (Connection: close, an error, the drain).
        self._no_more = False
        # The peer is gone: nothing will be written.
        self.peer_gone = False
        self._close_sent = False

    # --- what the shell asks -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return 0 if self._current is None else 1

    @property
    def mid_frame(self) -> bool:
        """A request has begun arriving and is not whole (while one is answered, the bytes
        behind it are not parsed yet, so none counts as begun)."""
        return self._current is None and not self._no_more and self._parser.mid_request

    @property
    def frames(self) -> int:
        return self._frames

    @property
    def wants_data(self) -> bool:
        if self.reading_done:
            return False
        return self._current is None or self._parser.buffered < PIPELINE_BUFFER

    # --- events in -----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Action]:
        if self.reading_done:
            return []
        self._parser.receive(data)
        return self._advance()

    def peer_closed(self, *, gone: bool) -> list[Action]:
        """The peer stopped sending: `gone`, it closed the connection (its work is cancelled);
        otherwise it shut only its write side and still gets the answers to what it sent."""
        self.reading_done = True
        if gone:
            self.peer_gone = True
            cancel: list[Action] = [CancelTask(self._current[0])] if self._current else []
            return cancel + self._maybe_close()
        return self._advance()

    def timed_out(self) -> list[Action]:
        if self.mid_frame:
            return self._last(http_api.http_error(HTTPStatus.REQUEST_TIMEOUT, "request too slow"))
        self.reading_done = self._no_more = True
        return self._maybe_close()

    def finish(self, rid: int, result: Response | EmbeddError) -> list[Action]:
        """The endpoint of request `rid` ended with this response (or error): the send."""
        if self._current is None or self._current[0] != rid:
            return []
        _, request, route = self._current
        self._current = None
        code = str(result.code) if isinstance(result, EmbeddError) else None
        response = route.errors(result) if isinstance(result, EmbeddError) else result
        response = self._cors(response, request.headers)
        return self._respond(response, keep_alive=request.keep_alive, code=code) + self._advance()

    def abandon(self, rid: int, error: EmbeddError) -> list[Action]:
        if self._current is None or self._current[0] != rid:
            return []
        return [CancelTask(rid), *self.finish(rid, error)]

    def shutdown(self) -> list[Action]:
        """The daemon started draining: the request being answered still gets its answer (with
        `Connection: close`); no other is taken, and an idle connection closes now."""
        self._no_more = True
        if self._current is None:
            self.reading_done = True
        return self._maybe_close()

    # --- the rules -----------------------------------------------------------------------------

    def _advance(self) -> list[Action]:
        """Take the next request from the bytes so far, unless one is being answered."""
        actions: list[Action] = []
        while self._current is None and not self._no_more:
            event = self._parser.next_event()
            if event is None:
                break
            if isinstance(event, HttpHead):
                if not self._key_ok(event):
                    self._frames += 1
                    response = self._cors(unauthorized(event.path), event.headers)
                    return actions + self._last(response)
                if _keyless(event) and _announces_body(event):
                    self._frames += 1
                    return actions + self._last(_no_body(event))
                if event.headers.get("expect", "").lower() == "100-continue":
                    actions.append(Send(_CONTINUE))
                continue
            self._frames += 1
            if isinstance(event, HttpError):
                return actions + self._last(http_api.http_error(event.status, event.message))
            if event.method == "OPTIONS":
                actions += self._respond(self._preflight(event), keep_alive=event.keep_alive)
                continue
            route = ROUTES.get((event.method, event.path))
            if route is None:
                actions += self._respond(_no_route(event), keep_alive=event.keep_alive)
                continue
            rid = self._next_rid
            self._next_rid += 1
            self._current = (rid, event, route)
            actions.append(RunEndpoint(rid, route, event))
        return actions + self._maybe_close()

    def _key_ok(self, head: HttpHead) -> bool:
        """Every request but the unauthenticated probes needs the key where one is set: an
        unknown path too, else its body would be read without one."""
        key = self.limits.api_key
        if key is None or _keyless(head):
            return True
        scheme, _, token = head.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), key.encode()
        )

    def _allowed_origin(self, headers: Mapping[str, str]) -> str | None:
        origin = headers.get("origin")
        allowed = self.limits.cors_origins
        if origin is None or not (origin in allowed or "*" in allowed):
            return None
        return origin

    def _cors(self, response: Response, headers: Mapping[str, str]) -> Response:
        """`response` with the CORS headers a page of an allowed origin needs to read it: a
        401 too, or the page sees a network error where it could say the key is wrong."""
        origin = self._allowed_origin(headers)
        if origin is None:
            return response
        return Response(
            response.status,
            response.body,
            {**response.headers, "Access-Control-Allow-Origin": origin, "Vary": "Origin"},
        )

    def _preflight(self, request: HttpRequest) -> Response:
        """A browser asking whether a page of `Origin` may call us (CORS preflight)."""
        origin = self._allowed_origin(request.headers)
        if origin is None:
            return http_api.http_error(
                HTTPStatus.FORBIDDEN,
                f"origin {request.headers.get('origin', '(none)')[:100]!r} may not call this API "
                "from a browser; add it to cors_origins in the daemon's config",
            )
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": str(_CORS_MAX_AGE),
            "Vary": "Origin",
        }
        return Response(HTTPStatus.NO_CONTENT, b"", headers)

    def _respond(
        self, response: Response, *, keep_alive: bool, code: str | None = None
    ) -> list[Action]:
        """Send `response` (counted whether or not it can still be written): `code` is the
        embedd error it reports, if any."""
        if code is None and response.status >= 400:
            code = f"http_{int(response.status)}"
        self.tally.count_key(code)
        keep = keep_alive and not self._no_more
        if not keep:
            self.reading_done = self._no_more = True
        if self.peer_gone or self._close_sent:
            return []
        return [Send(piece) for piece in encode(response, keep_alive=keep)]

    def _last(self, response: Response) -> list[Action]:
        """Answer with `response`, then close: after it the stream cannot be trusted."""
        return self._respond(response, keep_alive=False) + self._maybe_close()

    def _maybe_close(self) -> list[Action]:
        done = self._no_more or self.reading_done
        if done and self._current is None and not self._close_sent:
            self._close_sent = True
            return [Close()]
        return []


def _keyless(head: HttpHead) -> bool:
    """Requests anyone may make without the key: the probes, and CORS preflights (a browser
    never sends credentials with a preflight: the Fetch standard)."""
    route = ROUTES.get((head.method, head.path))
    return head.method == "OPTIONS" or (route is not None and not route.authenticated)


def _announces_body(head: HttpHead) -> bool:
    """Whether a body follows the head (the parser has checked Content-Length is digits)."""
    length = head.headers.get("content-length", "0")
    return "transfer-encoding" in head.headers or (length.isdigit() and int(length) > 0)


def _no_body(head: HttpHead) -> Response:
    """What a keyless request announcing a body gets: any body it took would be buffered for
    a caller who showed no key, up to max_frame per connection."""
    return http_api.http_error(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"{head.method} {head.path[:100]} takes no body (the limit is 0 bytes)",
    )


def _no_route(request: HttpRequest) -> Response:
    known = any(path == request.path for _method, path in ROUTES)
    status = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
    return http_api.http_error(status, f"no {request.method} {request.path[:100]}")
