"""What each op does, and the daemon's life from start to a clean exit.

`Daemon` answers typed requests and knows nothing about sockets; `server.py` is the transport
shell around it. `run` wires the two together with signal handling and the idle sweep.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt

from . import __version__
from .cache import Entry, VectorCache
from .config import Config
from .errors import Code, EmbeddError
from .messages import EmbedArgs, ModelArgs, Request, TokenizeArgs
from .models import ModelRegistry
from .protocol import PROTOCOL_VERSION
from .worker import EmbedJob, TokenizeJob

_log = logging.getLogger("embedd.daemon")

_SHUTDOWN_GRACE = 0.2
_LIST_ON_LOOP_MAX = 50_000
# Refused while draining; questions about the daemon (hello, health, stats...) still answer.
_WORK_OPS = frozenset({"embed", "tokenize", "load", "unload", "shutdown"})


class Daemon:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.models = ModelRegistry(config, loop)
        self.cache = VectorCache(config.cache_bytes)
        self.started = time.monotonic()
        self.draining = False
        self.stop_requested = asyncio.Event()
        self.requests_total = 0
        self.requests_ok = 0
        self.errors: Counter[str] = Counter()
        self.connections_open = 0
        self.connections_total = 0
        self.connections_refused = 0

    def count(self, error: EmbeddError | None) -> None:
        self.requests_total += 1
        if error is None:
            self.requests_ok += 1
        else:
            self.errors[str(error.code)] += 1

    async def handle(self, req: Request, owner: object = None) -> dict[str, Any]:
        """Answer one request; `owner` (the connection) is whose turn it is when batching."""
        args = req.args
        op = req.op
        if self.draining and op in _WORK_OPS:
            raise EmbeddError(
                Code.SHUTTING_DOWN, "the daemon is shutting down and takes no new work"
            )
        if op == "embed":
            assert isinstance(args, EmbedArgs)
            return await self._embed(args, owner)
        if op == "tokenize":
            assert isinstance(args, TokenizeArgs)
            return await self._tokenize(args)
        if op == "hello":
            return {
                "protocol": PROTOCOL_VERSION,
                "server": f"embedd {__version__}",
                "pid": os.getpid(),
                "models": sorted(self.models.slots),
                "max_frame": self.config.max_frame,
            }
        if op == "health":
            return self._health()
        if op == "models":
            return {"models": [s.describe() for s in self.models.slots.values()]}
        if op == "load":
            assert isinstance(args, ModelArgs)
            slot = self.models.get(args.model)
            await slot.load(self.config.request_timeout)
            return slot.describe()
        if op == "unload":
            assert isinstance(args, ModelArgs)
            slot = self.models.get(args.model)
            await slot.unload()
            return slot.describe()
        if op == "stats":
            return self._stats()
        if op == "shutdown":
            if not self.config.allow_shutdown:
                raise EmbeddError(
                    Code.FORBIDDEN,
                    "shutdown over the socket is disabled; set allow_shutdown = true in the "
                    "config, or stop the daemon with SIGTERM / the service manager",
                )
            _log.info("shutdown requested over the socket")
            self.loop.call_soon(self.stop_requested.set)
            return {}
        # `cancel` never gets here: the connection that owns the target answers it.
        raise EmbeddError(Code.INTERNAL, f"op {op!r} has no handler")

    def _health(self) -> dict[str, Any]:
        return {
            "status": "shutting_down" if self.draining else "ok",
            "uptime": round(time.monotonic() - self.started, 3),
            "models_ready": sum(1 for s in self.models.slots.values() if s.state == "ready"),
        }

    def _stats(self) -> dict[str, Any]:
        models: dict[str, Any] = {}
        for name, slot in self.models.slots.items():
            st = slot.stats
            w = slot.worker
            models[name] = {
                "state": slot.state,
                "requests": st.requests,
                "inputs": st.inputs,
                "tokens": st.tokens,
                "batches": st.batches,
                "cancelled": st.cancelled,
                "queue_inputs": w.queued_inputs if w else 0,
                "queue_tokens": w.queued_tokens if w else 0,
                "tokens_per_second": round(st.tokens_per_second, 1),
            }
        return {
            "uptime": round(time.monotonic() - self.started, 3),
            "connections": {
                "open": self.connections_open,
                "total": self.connections_total,
                "refused": self.connections_refused,
            },
            "requests": {
                "total": self.requests_total,
                "ok": self.requests_ok,
                "errors": dict(self.errors),
            },
            "models": models,
            "cache": self.cache.stats(),
        }

    async def _embed(self, args: EmbedArgs, owner: object) -> dict[str, Any]:
        slot = self.models.get(args.model)
        prefix = self.models.prompt_prefix(slot, args.prompt)
        texts = [prefix + t for t in args.inputs] if prefix else list(args.inputs)
        timeout = args.timeout or self.config.request_timeout
        deadline = self.loop.time() + timeout
        info = await slot.load(timeout)

        # Cache hits skip the model; identical texts within the request are computed once.
        rows: list[Entry | None] = [None] * len(texts)
        todo: dict[str, list[int]] = {}
        keys = [
            (info.fingerprint, t, args.truncate, args.normalize, args.dimensions) for t in texts
        ]
        use_cache = args.cache and self.cache.max_bytes > 0
        for i, key in enumerate(keys):
            entry = self.cache.get(key) if use_cache else None
            if entry is not None:
                rows[i] = entry
            else:
                todo.setdefault(texts[i], []).append(i)

        if todo:
            unique = list(todo)
            bulk = (
                args.priority == "bulk"
                if args.priority is not None
                else len(unique) > self.config.bulk_threshold
            )
            job = EmbedJob(
                texts=unique,
                future=self.loop.create_future(),
                loop=self.loop,
                truncate=args.truncate,
                normalize=args.normalize,
                dimensions=args.dimensions,
                bulk=bulk,
                owner=owner,
                indices=[todo[t][0] for t in unique],
            )
            remaining = max(deadline - self.loop.time(), 0.001)
            computed = await slot.run(job, remaining, timeout_reported=timeout)
            vecs = computed["vectors"]
            for j, text in enumerate(unique):
                entry = Entry(vecs[j], computed["tokens"][j], computed["truncated"][j])
                if use_cache:
                    self.cache.put(keys[todo[text][0]], entry)
                for i in todo[text]:
                    rows[i] = entry
            if len(unique) == len(texts):  # nothing cached, nothing repeated: no reassembly
                return await self._embed_result(
                    args, vecs, computed["tokens"], computed["truncated"]
                )

        done = [r for r in rows if r is not None]
        assert len(done) == len(rows)
        matrix = np.stack([r.vector for r in done]) if done else np.empty((0, 0), np.float32)
        return await self._embed_result(
            args, matrix, [r.tokens for r in done], [r.truncated for r in done]
        )

    async def _embed_result(
        self,
        args: EmbedArgs,
        vecs: npt.NDArray[np.float32],
        tokens: list[int],
        truncated: list[bool],
    ) -> dict[str, Any]:
        embeddings: Any
        if args.encoding == "f32":
            embeddings = np.ascontiguousarray(vecs, dtype="<f4").tobytes()
        elif vecs.size > _LIST_ON_LOOP_MAX:  # building millions of floats would stall the loop
            embeddings = await asyncio.to_thread(vecs.tolist)
        else:
            embeddings = vecs.tolist()
        return {
            "model": args.model,
            "dim": int(vecs.shape[1]),
            "count": int(vecs.shape[0]),
            "encoding": args.encoding,
            "embeddings": embeddings,
            "tokens": tokens,
            "truncated": truncated,
            "usage": {"prompt_tokens": sum(tokens)},
        }

    async def _tokenize(self, args: TokenizeArgs) -> dict[str, Any]:
        slot = self.models.get(args.model)
        prefix = self.models.prompt_prefix(slot, args.prompt)
        job = TokenizeJob(
            texts=[prefix + t for t in args.inputs],
            future=self.loop.create_future(),
            loop=self.loop,
        )
        result = await slot.run(job, self.config.request_timeout)
        info = slot.last_info
        return {"model": args.model, **result, "max_tokens": info.max_tokens if info else None}


def setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # llama.cpp's own chatter (model metadata, graph sizes) only with --verbose.
    logging.getLogger("embedd.llama").setLevel(logging.DEBUG if verbose else logging.WARNING)


async def _sweep(daemon: Daemon) -> None:
    while True:
        await asyncio.sleep(1.0)
        await daemon.models.sweep_idle()


async def serve(config: Config) -> int:
    from .activation import ActivationError, inherited_socket
    from .server import Server, SocketInUseError
    from .supervise import Supervisor

    loop = asyncio.get_running_loop()
    daemon = Daemon(config, loop)
    server = Server(config, daemon)
    try:
        # A socket passed by systemd or launchd is served instead of binding our own.
        await server.start(inherited_socket())
    except (SocketInUseError, ActivationError) as exc:
        _log.error("%s", exc)
        return 1
    # Windows has no signal handlers in asyncio: Ctrl-C ends the process there.
    signals = (signal.SIGTERM, signal.SIGINT) if sys.platform != "win32" else ()
    for sig in signals:
        loop.add_signal_handler(sig, daemon.stop_requested.set)
    sweeper = asyncio.create_task(_sweep(daemon))
    _log.info(
        "embedd %s serving on %s%s (pid %d; models: %s)",
        __version__,
        server.address,
        f" (passed by {server.inherited.manager})" if server.inherited else "",
        os.getpid(),
        ", ".join(sorted(config.models)),
    )
    supervisor = Supervisor(daemon, server)
    supervisor.start()
    try:
        await daemon.stop_requested.wait()
        supervisor.stopping()
        await server.stop_accepting()
        # Requests a client sent just before the signal may still sit in the socket buffers:
        # give the connections a moment to read them, so they are served rather than refused.
        await asyncio.sleep(_SHUTDOWN_GRACE)
        daemon.draining = True
        _log.info("stopping: no new connections; finishing %d requests in flight", server.inflight)
        await server.drain()
        sweeper.cancel()
        await daemon.models.close()
        await server.close()
    finally:
        await supervisor.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    _log.info("stopped")
    return 0


def run(config: Config, *, verbose: bool = False) -> int:
    """Run the daemon until SIGTERM/SIGINT (or an allowed `shutdown`); returns the exit code."""
    setup_logging(verbose)
    try:
        return asyncio.run(serve(config))
    except OSError as exc:
        _log.error("cannot serve on %s: %s", config.socket, exc)
        return 1
