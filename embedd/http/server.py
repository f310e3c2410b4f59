"""The HTTP front door: an asyncio shell around `http_protocol` (bytes) and `http_api` (meaning).

Off by default. `--http-socket PATH` serves it on a Unix socket of its own (created like the
msgpack socket: 0600 in a 0700 directory, peer credentials checked); `--http HOST:PORT` on TCP,
which has no peer credentials, so it requires `Authorization: Bearer KEY` (the key file is
created with a random key if missing) unless the operator says `--no-api-key`, and binds only
loopback addresses unless `--http-allow-remote`. Each HTTP request is its own owner in the
scheduler's turns, and a client that disconnects has its work cancelled, as on the msgpack
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

from ..config import Config
from ..transport.peercred import AccessPolicy, peer_of
from ..transport.server import Handler
from ..transport.sockets import bind_unix_socket
from ..wire.counters import ConnectionCounts
from ..wire.errors import EmbeddError
from ..wire.messages import Embed, Limits, Load, Models, Request, Stats
from . import api as http_api
from . import metrics
from .api import ApiError, Response
from .parser import HttpError, HttpParser, HttpRequest, encode_response, json_body

_log = logging.getLogger("embedd.http")

_READ_SIZE = 256 * 1024
# Random bytes in a generated API key (256 bits, urlsafe base64).
_KEY_BYTES = 32


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


class HttpServer:
    def __init__(
        self,
        config: Config,
        handler: Handler,
        stats: Callable[[], dict[str, Any]],
        connections: ConnectionCounts,
    ) -> None:
        self.config = config
        self.handler = handler
        self.stats = stats
        self.connections = connections
        self.limits = Limits(max_inputs=config.max_inputs)
        self.policy = AccessPolicy.for_daemon(config.allow_uids, config.allow_gid)
        self.api_key: str | None = None
        self.servers: list[asyncio.Server] = []
        self.addresses: list[str] = []
        self.open: set[asyncio.Task[None]] = set()
        self.started = time.time()

    async def start(self, inherited: socket.socket | None = None) -> None:
        cfg = self.config
        if inherited is not None:
            server = await self._serve_socket(inherited)
            self.servers.append(server)
            self.addresses.append(f"{inherited.getsockname()} (passed by the service manager)")
        if cfg.http_socket is not None and inherited is None:
            sock = bind_unix_socket(cfg.http_socket)
            self.servers.append(await asyncio.start_unix_server(self._on_connect, sock=sock))
            self.addresses.append(str(cfg.http_socket))
        if cfg.http is not None:
            host, port = parse_address(cfg.http, allow_remote=cfg.http_allow_remote)
            if cfg.api_key_file is not None:
                self.api_key = load_api_key(cfg.api_key_file)
            elif not cfg.no_api_key:
                raise HttpSetupError(
                    "--http needs an API key: any local user can reach a TCP port. Give "
                    "--api-key-file PATH (created with a random key if missing), or pass "
                    "--no-api-key to serve without one"
                )
            server = await asyncio.start_server(self._on_connect, host, port)
            self.servers.append(server)
            bound = server.sockets[0].getsockname()
            self.addresses.append(f"http://{bound[0]}:{bound[1]}")
        for address in self.addresses:
            _log.info("HTTP API (OpenAI- and Ollama-compatible) on %s", address)

    async def _serve_socket(self, sock: socket.socket) -> asyncio.Server:
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            return await asyncio.start_unix_server(self._on_connect, sock=sock)
        if self.config.api_key_file is not None:
            self.api_key = load_api_key(self.config.api_key_file)
        elif not self.config.no_api_key:
            raise HttpSetupError("a TCP socket was passed for HTTP: give --api-key-file")
        return await asyncio.start_server(self._on_connect, sock=sock)

    @property
    def port(self) -> int | None:
        for server in self.servers:
            for sock in server.sockets:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    return int(sock.getsockname()[1])
        return None

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.open):
            task.cancel()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    # --- one connection ----------------------------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.open.add(task)
        self.connections.total += 1
        try:
            if self._refused(writer):
                self.connections.refused += 1
                writer.write(_error_bytes(HTTPStatus.FORBIDDEN, "this user may not connect"))
                return
            await self._serve(reader, writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.open.discard(task)
            writer.close()

    def _refused(self, writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        if sock is None or sock.family != socket.AF_UNIX:
            return False
        try:
            peer = peer_of(sock.fileno())
        except OSError:
            return True
        return peer is not None and not self.policy.allows(peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = HttpParser(max_body=self.config.max_frame)
        # A Unix socket has peer credentials (checked at the door); TCP has only the key.
        sock = writer.get_extra_info("socket")
        needs_key = self.api_key is not None and (sock is None or sock.family != socket.AF_UNIX)
        pending: list[HttpRequest] = []
        while True:
            if not pending:
                wait = self.config.frame_timeout if parser.mid_request else self.config.idle_timeout
                try:
                    async with asyncio.timeout(wait):
                        data = await reader.read(_READ_SIZE)
                except TimeoutError:
                    self.connections.timed_out += 1
                    if parser.mid_request:
                        writer.write(_error_bytes(HTTPStatus.REQUEST_TIMEOUT, "request too slow"))
                    return
                if not data:
                    return
                for event in parser.feed(data):
                    if isinstance(event, HttpError):
                        writer.write(_error_bytes(event.status, event.message))
                        await writer.drain()
                        return
                    pending.append(event)
                continue
            request = pending.pop(0)
            response = await self._answer_watching(request, needs_key, reader, parser, pending)
            if response is None:
                return  # the client went away: its work was cancelled
            keep = request.keep_alive
            writer.write(
                encode_response(
                    response.status,
                    response.body if isinstance(response.body, bytes) else json_body(response.body),
                    content_type=response.headers.pop("Content-Type", "application/json"),
                    keep_alive=keep,
                    extra=response.headers,
                )
            )
            await writer.drain()
            if not keep:
                return

    async def _answer_watching(
        self,
        request: HttpRequest,
        needs_key: bool,
        reader: asyncio.StreamReader,
        parser: HttpParser,
        pending: list[HttpRequest],
    ) -> Response | None:
        """Answer `request` while reading on: pipelined requests queue up; EOF means the client
        went away, which cancels the work."""
        work = asyncio.create_task(self._answer(request, needs_key))
        while True:
            reading = asyncio.create_task(reader.read(_READ_SIZE))
            done, _ = await asyncio.wait({work, reading}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                if reading.done():
                    self._queue(reading.result(), parser, pending)
                else:
                    reading.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        data = await reading
                        self._queue(data, parser, pending)
                return work.result()
            data = reading.result() if reading.exception() is None else b""
            if not data:
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await work
                return None
            self._queue(data, parser, pending)

    @staticmethod
    def _queue(data: bytes, parser: HttpParser, pending: list[HttpRequest]) -> None:
        if not data:
            return
        for event in parser.feed(data):
            if isinstance(event, HttpRequest):
                pending.append(event)

    # --- routing -------------------------------------------------------------------------------

    async def _answer(self, request: HttpRequest, needs_key: bool) -> Response:
        route = _ROUTES.get((request.method, request.path))
        if route is None:
            known = any(path == request.path for _method, path in _ROUTES)
            status = HTTPStatus.METHOD_NOT_ALLOWED if known else HTTPStatus.NOT_FOUND
            return http_api.http_error(status, f"no {request.method} {request.path[:100]}")
        if needs_key and route.authenticated and not self._authorized(request):
            return Response(
                HTTPStatus.UNAUTHORIZED,
                {
                    "error": {
                        "message": "missing or wrong API key: send Authorization: Bearer KEY "
                        "(the key is in the daemon's api_key_file)",
                        "type": "authentication_error",
                    }
                },
                {"WWW-Authenticate": "Bearer"},
            )
        try:
            return await route.run(self, request)
        except ApiError as exc:
            return exc.response
        except EmbeddError as exc:
            return route.error(exc)

    def _authorized(self, request: HttpRequest) -> bool:
        assert self.api_key is not None
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    async def _run(self, args: Any) -> dict[str, Any]:
        # Each HTTP request is its own owner: it takes its turn like a connection does.
        return await self.handler.handle(Request(0, args), owner=object())

    async def _models(self) -> list[dict[str, Any]]:
        result = await self._run(Models())
        models: list[dict[str, Any]] = result["models"]
        return models

    # The endpoints.

    async def openai_embeddings(self, request: HttpRequest) -> Response:
        call = http_api.openai_embed(http_api.parse_json(request.body), self.limits)
        result = await self._run(call.request)
        return Response(HTTPStatus.OK, http_api.openai_embed_result(call, result))

    async def openai_models(self, request: HttpRequest) -> Response:
        return Response(HTTPStatus.OK, http_api.openai_models(await self._models(), self.started))

    async def ollama_embed(self, request: HttpRequest) -> Response:
        started = time.monotonic_ns()
        embed = http_api.ollama_embed(http_api.parse_json(request.body), self.limits)
        load_ns = await self._load_time(embed)
        result = await self._run(embed)
        return Response(
            HTTPStatus.OK, http_api.ollama_embed_result(result, embed.model, started, load_ns)
        )

    async def _load_time(self, embed: Embed) -> int:
        """Ollama reports how long loading took: the model is loaded first, timed."""
        started = time.monotonic_ns()
        if embed.model in {m["name"] for m in await self._models()}:
            await self._run(Load(embed.model))
        return time.monotonic_ns() - started

    async def ollama_legacy(self, request: HttpRequest) -> Response:
        embed = http_api.ollama_legacy(http_api.parse_json(request.body), self.limits)
        return Response(HTTPStatus.OK, http_api.ollama_legacy_result(await self._run(embed)))

    async def ollama_tags(self, request: HttpRequest) -> Response:
        return Response(HTTPStatus.OK, http_api.ollama_tags(await self._models()))

    async def ollama_ps(self, request: HttpRequest) -> Response:
        return Response(HTTPStatus.OK, http_api.ollama_ps(await self._models()))

    async def ollama_version(self, request: HttpRequest) -> Response:
        return Response(HTTPStatus.OK, http_api.ollama_version())

    async def health(self, request: HttpRequest) -> Response:
        if self.handler.draining:
            return Response(
                HTTPStatus.SERVICE_UNAVAILABLE, {"status": "shutting_down"}, {"Retry-After": "5"}
            )
        state = {m["name"]: m["state"] for m in await self._models()}.get("default")
        if state in ("loading", "failed"):
            return Response(HTTPStatus.SERVICE_UNAVAILABLE, {"status": state}, {"Retry-After": "1"})
        return Response(HTTPStatus.OK, {"status": "ok", "default_model": state})

    async def metrics(self, request: HttpRequest) -> Response:
        stats = await self._run(Stats())
        return Response(
            HTTPStatus.OK,
            metrics.render(stats).encode(),
            {"Content-Type": metrics.CONTENT_TYPE},
        )


class _Route:
    def __init__(
        self,
        run: Callable[[HttpServer, HttpRequest], Awaitable[Response]],
        error: Callable[[EmbeddError], Response] = http_api.openai_error,
        *,
        authenticated: bool = True,
    ) -> None:
        self.run = run
        self.error = error
        self.authenticated = authenticated


_ROUTES: dict[tuple[str, str], _Route] = {
    ("POST", "/v1/embeddings"): _Route(HttpServer.openai_embeddings),
    ("GET", "/v1/models"): _Route(HttpServer.openai_models),
    ("POST", "/api/embed"): _Route(HttpServer.ollama_embed, http_api.ollama_error),
    ("POST", "/api/embeddings"): _Route(HttpServer.ollama_legacy, http_api.ollama_error),
    ("GET", "/api/tags"): _Route(HttpServer.ollama_tags, http_api.ollama_error),
    ("GET", "/api/ps"): _Route(HttpServer.ollama_ps, http_api.ollama_error),
    ("GET", "/api/version"): _Route(HttpServer.ollama_version, http_api.ollama_error),
    # Probes from a service manager or a load balancer need no key.
    ("GET", "/health"): _Route(HttpServer.health, authenticated=False),
    ("GET", "/metrics"): _Route(HttpServer.metrics),
}


def _error_bytes(status: HTTPStatus, message: str) -> bytes:
    body = json_body({"error": {"message": message, "type": "invalid_request_error"}})
    return encode_response(status, body, keep_alive=False)
