"""The HTTP front door: a `transport.shell.Listener` whose connections each run an
`HttpConversation` (conversation.py: the rules), with the endpoints' work here and the APIs'
meaning in api.py.

Off by default. `--http-socket PATH` serves it on a Unix socket of its own (created like the
msgpack socket: 0600 in a 0700 directory, peer credentials checked); `--http HOST:PORT` on TCP,
which has no peer credentials, so it requires `Authorization: Bearer KEY` (the key file is
created with a random key if missing) unless the operator says `--no-api-key`, and binds only
loopback addresses unless `--http-allow-remote`. Each HTTP request is its own owner in the
scheduler's turns, and a client that disconnects has its work cancelled, as on the msgpack
socket. Every limit a connection has (the cap, deadlines, backpressure, the write deadline, the
drain) is the shell's, shared with the msgpack socket; what is left here is how each answer is
sized (`max_response`, counting JSON's real size: the daemon checks it before any work) and
encoding large ones off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol

from ..config import Config
from ..transport.counters import ConnectionCounts, Tally
from ..transport.shell import Connection, Handler, Listener, RequestTask, Reservation, Timer
from ..transport.sockets import bind_unix_socket
from ..wire.answers import (
    TOKEN_PIECE_JSON_BYTES,
    Answer,
    ChunkAnswer,
    EmbedAnswer,
    MapAnswer,
    RerankAnswer,
    Sizing,
    StatsAnswer,
    TokenizeAnswer,
)
from ..wire.errors import Code, EmbeddError
from ..wire.messages import DEFAULT_MODEL, Embed, Limits, Load, Models, Request, Rerank, Stats
from . import api as http_api
from . import metrics
from .api import ApiError, Response
from .conversation import ROUTES, HttpConversation, HttpLimits, RunEndpoint, refusal
from .parser import HttpRequest, json_body

_log = logging.getLogger("embedd.http")

_READ_SIZE = 256 * 1024
# Random bytes in a generated API key (256 bits, urlsafe base64).
_KEY_BYTES = 32
# Bodies and answers up to this size are decoded and encoded on the event loop; larger ones in
# a thread. json handles ~100 MB/s here, so 256 KiB is ~2.5 ms of loop time at most, about
# the cost of one query batch (about 4 ms for the bundled model on 2 cores).
_ON_LOOP_BYTES = 256 * 1024
# The longest JSON escape of one character ("\u0001").
_ESCAPED_CHAR = 6


class HttpSetupError(Exception):
    """The HTTP listener cannot start as configured; the message says why and what to do."""


def load_api_key(path: Path) -> str:
    """The key in `path`, creating the file (0600, a random key) if it does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(_KEY_BYTES) + "\n")
        _log.info("created the HTTP API key file %s (mode 0600)", path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # As ssh does for a private key: a key others can read is no key.
        raise HttpSetupError(
            f"API key file {path} is accessible by others (mode {mode:04o}); run: chmod 600 {path}"
        )
    key = path.read_text().strip()
    if not key:
        raise HttpSetupError(f"API key file {path} is empty")
    return key


def parse_address(text: str, *, allow_remote: bool) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise HttpSetupError(f"--http {text!r}: expected HOST:PORT, e.g. 127.0.0.1:11435")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise HttpSetupError(
            f"--http {text}: {host} is not a loopback address; embedd serves other machines "
            "only when told so (--http-allow-remote / http_allow_remote = true)"
        )
    return host, int(port)


def check_options(config: Config) -> None:
    """The HTTP options as given: an address that is HOST:PORT (loopback unless allowed) and a
    key for TCP. Checked before anything starts, so a mistake is a usage error (exit status 2)
    at once, not a daemon that starts and stops."""
    if config.http is not None:
        parse_address(config.http, allow_remote=config.http_allow_remote)
        if config.api_key_file is None and not config.no_api_key:
            raise HttpSetupError(
                "--http needs an API key: any local user can reach a TCP port. Give "
                "--api-key-file PATH (created with a random key if missing), or pass "
                "--no-api-key to serve without one"
            )


class HttpHandler(Handler, Protocol):
    """What the HTTP front needs of the daemon beyond a transport's needs."""

    def http_long(self, model: str) -> str: ...


class HttpServer(Listener):
    def __init__(
        self,
        config: Config,
        handler: HttpHandler,
        stats: Callable[[], StatsAnswer],
        connections: ConnectionCounts,
        timer: Timer | None = None,
        tally: Tally | None = None,
    ) -> None:
        super().__init__(config, handler, connections, timer=timer)
        self.daemon = handler
        self.stats = stats
        # The daemon's one tally (shared with the msgpack socket): each response is counted.
        self.tally = tally if tally is not None else Tally()
        self.limits = Limits(max_inputs=config.max_inputs)
        self.api_key: str | None = None
        self.servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self.started = time.time()

    def prepare(self) -> None:
        """Everything that can fail before a socket is bound (options, the key file), so that
        a daemon that cannot serve HTTP exits at once instead of starting its other socket."""
        check_options(self.config)
        if self.config.api_key_file is not None and self.config.http is not None:
            self.api_key = load_api_key(self.config.api_key_file)

    async def start(self, inherited: socket.socket | None = None) -> None:
        cfg = self.config
        if inherited is not None:
            server = await self._serve_socket(inherited)
            self.servers.append(server)
            self.addresses.append(f"{inherited.getsockname()} (passed by the service manager)")
        if cfg.http_socket is not None and inherited is None:
            sock = bind_unix_socket(cfg.http_socket)
            self.servers.append(await asyncio.start_unix_server(self.on_connect, sock=sock))
            self.addresses.append(str(cfg.http_socket))
        if cfg.http is not None:
            host, port = parse_address(cfg.http, allow_remote=cfg.http_allow_remote)
            if self.api_key is None and cfg.api_key_file is not None:
                self.api_key = load_api_key(cfg.api_key_file)
            server = await asyncio.start_server(self.on_connect, host, port)
            self.servers.append(server)
            bound = server.sockets[0].getsockname()
            self.addresses.append(f"http://{bound[0]}:{bound[1]}")
        for address in self.addresses:
            _log.info("HTTP API (OpenAI- and Ollama-compatible) on %s", address)

    async def _serve_socket(self, sock: socket.socket) -> asyncio.Server:
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            return await asyncio.start_unix_server(self.on_connect, sock=sock)
        if self.config.api_key_file is not None:
            self.api_key = load_api_key(self.config.api_key_file)
        elif not self.config.no_api_key:
            raise HttpSetupError("a TCP socket was passed for HTTP: give --api-key-file")
        return await asyncio.start_server(self.on_connect, sock=sock)

    @property
    def port(self) -> int | None:
        for server in self.servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    async def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    async def close(self) -> None:
        await self.close_connections()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    # --- the listener's protocol ---------------------------------------------------------------

    def new_conversation(self, writer: asyncio.StreamWriter) -> HttpConversation:
        # A Unix socket has peer credentials (checked at the door); TCP has only the key.
        sock = writer.get_extra_info("socket")
        unix = sock is not None and sock.family == socket.AF_UNIX
        key = None if unix else self.api_key
        return HttpConversation(
            HttpLimits(
                max_body=self.config.max_frame,
                api_key=key,
                cors_origins=self.config.cors_origins,
            ),
            self.tally,
        )

    def door(self, writer: asyncio.StreamWriter) -> str:
        # The Unix socket's peers are checked at the door; TCP's are anyone on the machine,
        # and without caps of their own, keyless TCP connections could fill the Unix one's.
        sock = writer.get_extra_info("socket")
        return "unix" if sock is not None and sock.family == socket.AF_UNIX else "tcp"

    def start_task(self, conn: Connection, action: object) -> RequestTask:
        assert isinstance(action, RunEndpoint), action
        return RequestTask(action.rid, functools.partial(self._serve, action))

    def refusal(self, error: EmbeddError) -> bytes:
        return refusal(error)

    async def _serve(self, action: RunEndpoint, reservation: Reservation) -> Response:
        try:
            return await _ENDPOINTS[action.route.name](self, action.request, reservation)
        except ApiError as exc:
            return exc.response

    # --- helpers -------------------------------------------------------------------------------

    async def _run(
        self, args: Any, sizing: Sizing | None = None, reservation: Reservation | None = None
    ) -> Answer:
        # Each HTTP request is its own owner: it takes its turn like a connection does.
        reserve = reservation.reserve if reservation is not None else None
        return await self.handler.handle(
            Request(0, args), owner=object(), sizing=sizing, reserve=reserve
        )

    async def _embed(self, embed: Embed, reservation: Reservation, fmt: str = "float") -> _Sized:
        """Run an embed request, its answer sized as JSON in `fmt`: the daemon refuses it over
        max_response once the model's dimension is known, else reserves it in the
        connection's answer budget, before any work."""
        sizing = http_api.answer_sizing(fmt, embed.precision)
        answer = await self._run(embed, sizing, reservation)
        if not isinstance(answer, EmbedAnswer):
            raise EmbeddError(Code.INTERNAL, f"embed answered {type(answer).__name__}")
        return _Sized(answer, sizing.size(answer.count, answer.dim))

    async def _models(self) -> list[dict[str, Any]]:
        answer = await self._run(Models())
        assert isinstance(answer, MapAnswer), answer
        models: list[dict[str, Any]] = answer.values["models"]
        return models

    @staticmethod
    async def _json(body: bytes) -> dict[str, Any]:
        if len(body) <= _ON_LOOP_BYTES:
            return http_api.parse_json(body)
        return await asyncio.to_thread(http_api.parse_json, body)

    @staticmethod
    async def _encoded(
        size: int, encode: Callable[[], bytes | bytearray], headers: dict[str, str] | None = None
    ) -> Response:
        """An OK response with its JSON body encoded off the loop when large."""
        body = encode() if size <= _ON_LOOP_BYTES else await asyncio.to_thread(encode)
        return Response(HTTPStatus.OK, body, headers or {})

    def _long_default(self, body: dict[str, Any]) -> str:
        model = body.get("model")
        name = model.removesuffix(":latest") if isinstance(model, str) else ""
        return self.daemon.http_long(name)

    # --- the endpoints (ROUTES in conversation.py names them) ----------------------------------

    async def openai_embeddings(self, request: HttpRequest, reservation: Reservation) -> Response:
        body = await self._json(request.body)
        call = http_api.openai_embed(body, self.limits, self._long_default(body))
        done = await self._embed(call.request, reservation, call.encoding_format)
        answer = done.answer
        headers = http_api.long_report(answer)[1]
        return await self._encoded(
            done.size, lambda: http_api.openai_embed_json(call, answer), headers
        )

    async def openai_models(self, request: HttpRequest, reservation: Reservation) -> Response:
        return Response(HTTPStatus.OK, http_api.openai_models(await self._models(), self.started))

    async def ollama_embed(self, request: HttpRequest, reservation: Reservation) -> Response:
        started = time.monotonic_ns()
        body = await self._json(request.body)
        embed = http_api.ollama_embed(body, self.limits, self._long_default(body))
        load_ns = await self._load_time(embed)
        done = await self._embed(embed, reservation)
        answer = done.answer
        return await self._encoded(
            done.size,
            lambda: http_api.ollama_embed_json(answer, embed.model, started, load_ns),
            http_api.long_report(answer)[1],
        )

    async def _load_time(self, embed: Embed) -> int:
        """Ollama reports how long loading took: the model is loaded first, timed."""
        started = time.monotonic_ns()
        if embed.model in {m["name"] for m in await self._models()}:
            await self._run(Load(embed.model))
        return time.monotonic_ns() - started

    async def ollama_legacy(self, request: HttpRequest, reservation: Reservation) -> Response:
        body = await self._json(request.body)
        embed = http_api.ollama_legacy(body, self.limits, self._long_default(body))
        done = await self._embed(embed, reservation)
        answer = done.answer
        return await self._encoded(
            done.size, lambda: json_body(http_api.ollama_legacy_result(answer))
        )

    async def ollama_tags(self, request: HttpRequest, reservation: Reservation) -> Response:
        return Response(HTTPStatus.OK, http_api.ollama_tags(await self._models()))

    async def ollama_ps(self, request: HttpRequest, reservation: Reservation) -> Response:
        return Response(HTTPStatus.OK, http_api.ollama_ps(await self._models()))

    async def ollama_version(self, request: HttpRequest, reservation: Reservation) -> Response:
        return Response(HTTPStatus.OK, http_api.ollama_version())

    async def health(self, request: HttpRequest, reservation: Reservation) -> Response:
        if self.handler.draining:
            return Response(
                HTTPStatus.SERVICE_UNAVAILABLE, {"status": "shutting_down"}, {"Retry-After": "5"}
            )
        state = {m["name"]: m["state"] for m in await self._models()}.get("default")
        if state in ("loading", "failed"):
            return Response(HTTPStatus.SERVICE_UNAVAILABLE, {"status": state}, {"Retry-After": "1"})
        return Response(HTTPStatus.OK, {"status": "ok", "default_model": state})

    # --- rerank (llama-server / Jina / Cohere, and TEI) --------------------------------------

    async def _rerank(self, call: Rerank, reservation: Reservation) -> RerankAnswer:
        answer = await self._run(call, None, reservation)
        if not isinstance(answer, RerankAnswer):
            raise EmbeddError(Code.INTERNAL, f"rerank answered {type(answer).__name__}")
        return answer

    async def rerank(self, request: HttpRequest, reservation: Reservation) -> Response:
        call = http_api.rerank(await self._json(request.body), self.limits)
        answer = await self._rerank(call, reservation)
        return Response(HTTPStatus.OK, http_api.rerank_json(call, answer))

    async def tei_rerank(self, request: HttpRequest, reservation: Reservation) -> Response:
        call = http_api.tei_rerank(await self._tei_body(request), self.limits)
        answer = await self._rerank(call.request, reservation)
        return Response(HTTPStatus.OK, http_api.tei_rerank_json(call, answer))

    async def metrics(self, request: HttpRequest, reservation: Reservation) -> Response:
        stats = await self._run(Stats())
        assert isinstance(stats, StatsAnswer), stats
        return Response(
            HTTPStatus.OK,
            metrics.render(stats.to_wire()).encode(),
            {"Content-Type": metrics.CONTENT_TYPE},
        )

    # --- text-embeddings-inference's routes (TEI_ROUTES) -------------------------------------

    async def _tei_body(self, request: HttpRequest) -> dict[str, Any]:
        """The body, its JSON refusal in TEI's shape (the route's errors)."""
        if len(request.body) <= _ON_LOOP_BYTES:
            return http_api.json_object(request.body)
        return await asyncio.to_thread(http_api.json_object, request.body)

    async def tei_embed(self, request: HttpRequest, reservation: Reservation) -> Response:
        body = await self._tei_body(request)
        long_default = self.daemon.http_long(http_api.tei_model(body))
        embed = http_api.tei_embed(body, self.limits, long_default)
        done = await self._embed(embed, reservation)
        answer = done.answer
        return await self._encoded(
            done.size, lambda: http_api.tei_embed_json(answer), http_api.long_report(answer)[1]
        )

    async def tei_info(self, request: HttpRequest, reservation: Reservation) -> Response:
        # The figures are the loaded model's: load it first, as the embed routes would.
        described = await self._run(Load(DEFAULT_MODEL))
        assert isinstance(described, MapAnswer), described
        model = described.values
        cfg = self.config
        batch_tokens = cfg.models[model["name"]].batch_tokens if model["name"] in cfg.models else 0
        info = http_api.tei_info(
            model,
            batch_tokens=batch_tokens,
            http_long=self.daemon.http_long(model["name"]),
            max_concurrent_requests=cfg.max_connections,
            max_client_batch_size=cfg.max_inputs,
        )
        return Response(HTTPStatus.OK, info)

    async def tei_tokenize(self, request: HttpRequest, reservation: Reservation) -> Response:
        call = http_api.tei_tokenize(await self._tei_body(request), self.limits)
        # Each token's JSON beside its text, and the texts (the body's own characters,
        # escaped at most 6 bytes each), estimated before any work.
        await reservation.reserve(TOKEN_PIECE_JSON_BYTES * len(request.body))
        answer = await self._run(call.request)
        assert isinstance(answer, TokenizeAnswer), answer
        size = TOKEN_PIECE_JSON_BYTES * sum(answer.counts) + _ESCAPED_CHAR * len(request.body)
        return await self._encoded(size, lambda: http_api.tei_tokenize_json(call, answer))

    # --- embedd's own ops (OPS_ROUTES) --------------------------------------------------------

    async def embedd_chunk(self, request: HttpRequest, reservation: Reservation) -> Response:
        chunk = http_api.embedd_chunk(await self._json(request.body), self.limits)
        size = http_api.chunk_answer_bytes(len(request.body))
        await reservation.reserve(size)
        answer = await self._run(chunk)
        assert isinstance(answer, ChunkAnswer), answer
        return await self._encoded(size, lambda: json_body(answer.to_wire()))

    async def embedd_tokenize(self, request: HttpRequest, reservation: Reservation) -> Response:
        tokenize = http_api.embedd_tokenize(await self._json(request.body), self.limits)
        answer = await self._run(tokenize)
        assert isinstance(answer, TokenizeAnswer), answer
        return Response(HTTPStatus.OK, answer.to_wire())


@dataclass(frozen=True)
class _Sized:
    """An embed answer and the size of its JSON."""

    answer: EmbedAnswer
    size: int


_Endpoint = Callable[[HttpServer, HttpRequest, Reservation], Awaitable[Response]]
_ENDPOINTS: dict[str, _Endpoint] = {
    route.name: getattr(HttpServer, route.name) for route in ROUTES.values()
}
