"""What each op does: typed requests in, typed answers (wire/answers.py) or an `EmbeddError` out.

`Daemon` knows nothing about sockets or about how it is started: the listeners (`msgpack_server.py`,
`http/server.py`) call `handle`, and the composition root (`app.py`) builds it and drives its life.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, assert_never

import numpy as np
import numpy.typing as npt

from .. import __version__
from ..config import Config
from ..inference.admission import estimate_tokens, estimate_windows
from ..inference.cache import CacheKey, Entry, VectorCache, rerank_keys, vector_keys
from ..inference.jobs import EmbedResult
from ..inference.modelprocess import read_rss_bytes
from ..inference.models import Clock, ModelRegistry
from ..transport.counters import ConnectionCounts, Tally
from ..wire import precision as compact
from ..wire.answers import (
    TOKEN_PIECE_JSON_BYTES,
    Answer,
    ChunkAnswer,
    ChunkPart,
    ConnectionStats,
    EmbedAnswer,
    MapAnswer,
    ModelStats,
    ProcessStats,
    ReplicaStats,
    RequestStats,
    RerankAnswer,
    RerankResult,
    Sizing,
    StatsAnswer,
    TokenizeAnswer,
    Usage,
)
from ..wire.errors import Code, EmbeddError
from ..wire.framing import PROTOCOL_VERSION
from ..wire.messages import (
    MAX_TIMEOUT,
    Cancel,
    Chunk,
    Embed,
    Health,
    Hello,
    Load,
    Models,
    Request,
    Rerank,
    Shutdown,
    Stats,
    Tokenize,
    Unload,
)
from .supervise import StatusSnapshot

_log = logging.getLogger("embedd.daemon")

# Bytes msgpack takes for one element of an `encoding: "list"` answer: a float as a float64
# (9), a packed byte of signs as an int (at most 2: -128..-33 and 128..255 take 2).
_LIST_FLOAT_BYTES = 9
_LIST_BYTE_BYTES = 2


def msgpack_sizing(encoding: str, precision: str) -> Sizing:
    """How the msgpack socket's embedding answer is sized, by the request's `encoding` and
    `precision` (a front that encodes otherwise passes its own `Sizing` to `handle`)."""
    if encoding == "f32":
        return Sizing(compact.component_bytes(precision))
    if compact.is_packed(precision):
        return Sizing(_LIST_BYTE_BYTES / 8)
    return Sizing(_LIST_FLOAT_BYTES)


# Bytes a token id takes at most in a `tokenize` answer (msgpack uint32).
_BYTES_PER_TOKEN_ID = 5
# Answers' fixed part (keys, counts, token lists) for the answer budget, generously.
_ANSWER_OVERHEAD = 512
# Bytes a window's span and counts take in a pool="none" answer (two msgpack uint32s and a
# list header, generously).
_BYTES_PER_SPAN = 16
# Bytes a rerank result takes without its document (index, score, its keys, a document's
# token and piece counts), generously.
_BYTES_PER_RERANK_RESULT = 48
# Dimension assumed for a model not loaded yet: the widest common embedding models (e5-large,
# bge-large) have 1024; over-estimating only delays a non-reading client's requests.
_UNKNOWN_DIM = 1024


class Daemon:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        *,
        tally: Tally | None = None,
        connections: ConnectionCounts | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.loop = loop
        # `clock`: what keep_alive is measured by (a test's fake clock; see models.py).
        self.models = ModelRegistry(config, loop, clock)
        self.cache = VectorCache(config.cache_bytes)
        self.started = time.monotonic()
        self.draining = False
        self.stop_requested = asyncio.Event()
        self.tally = tally if tally is not None else Tally()
        self.connections = connections if connections is not None else ConnectionCounts()

    async def handle(
        self,
        req: Request,
        owner: object = None,
        *,
        sizing: Sizing | None = None,
        reserve: Callable[[int], Awaitable[None]] | None = None,
    ) -> Answer:
        """Answer one request; `owner` (the connection) is whose turn it is when batching.

        An embed answer is sized by `sizing` (default: the msgpack encoding's) once the model's
        dimension is known, and refused over max_response; `reserve` is then given its size
        before any work (the HTTP front's answer budget)."""
        args = req.args
        if self.draining and args.is_work:
            raise EmbeddError(
                Code.SHUTTING_DOWN, "the daemon is shutting down and takes no new work"
            )
        _log.debug("request %d: %s", req.id, args.op)
        match args:
            case Embed():
                return await self._embed(
                    args, owner, sizing or msgpack_sizing(args.encoding, args.precision), reserve
                )
            case Tokenize():
                return await self._tokenize(args)
            case Rerank():
                return await self._rerank(args, owner, reserve)
            case Hello():
                return MapAnswer(self._hello())
            case Health():
                return MapAnswer(self._health())
            case Models():
                return MapAnswer({"models": [s.describe() for s in self.models.slots.values()]})
            case Load():
                slot = self.models.get(args.model)
                await slot.load(self.config.request_timeout, explicit=True)
                slot.touch()
                return MapAnswer(slot.describe())
            case Unload():
                slot = self.models.get(args.model)
                await slot.unload()
                return MapAnswer(slot.describe())
            case Stats():
                return self.stats()
            case Shutdown():
                if not self.config.allow_shutdown:
                    raise EmbeddError(
                        Code.FORBIDDEN,
                        "shutdown over the socket is disabled; set allow_shutdown = true in the "
                        "config, or stop the daemon with SIGTERM / the service manager",
                    )
                _log.info("shutdown requested over the socket")
                self.loop.call_soon(self.stop_requested.set)
                return MapAnswer()
            case Chunk():
                return await self._chunk(args)
            case Cancel():
                # The connection that owns the target answers `cancel` (conversation.py).
                raise EmbeddError(Code.INTERNAL, "cancel is answered by the connection")
            case _:
                assert_never(args)

    def answer_size(self, req: Request) -> int:
        """The answer's size in bytes, estimated before any work (the server's per-connection
        answer budget). A model not loaded yet is assumed as wide as `_UNKNOWN_DIM`."""
        args = req.args
        if isinstance(args, Embed):
            slot = self.models.by_name.get(args.model)
            dim = self.answer_dim(args) or _UNKNOWN_DIM
            vectors = len(args.input)
            if args.long == "split" and args.pool == "none" and slot is not None:
                vectors = _windows(args, "", slot.max_tokens)
            sizing = msgpack_sizing(args.encoding, args.precision)
            return _ANSWER_OVERHEAD + vectors * (sizing.size(1, dim) + _BYTES_PER_SPAN)
        if isinstance(args, Chunk):
            # Each chunk repeats its text, plus its span and count.
            return _ANSWER_OVERHEAD + 2 * len(args.input.encode("utf-8", "surrogatepass"))
        if isinstance(args, Rerank):
            texts = sum(len(d.encode("utf-8")) for d in args.documents)
            return (
                _ANSWER_OVERHEAD
                + len(args.documents) * _BYTES_PER_RERANK_RESULT
                + (texts if args.return_documents else 0)
            )
        if isinstance(args, Tokenize):
            # At most one token per byte, plus the special frame.
            chars = sum(len(t) + 4 for t in args.input)
            return _ANSWER_OVERHEAD + chars * _BYTES_PER_TOKEN_ID
        return _ANSWER_OVERHEAD

    def answer_dim(self, args: Embed) -> int | None:
        """The width of each vector an embed request will get, known before any work once its
        model has loaded (None before)."""
        slot = self.models.by_name.get(args.model)
        if slot is None or slot.last_info is None:
            return None
        dim = slot.last_info.dim
        return dim if args.dimensions is None else min(dim, args.dimensions)

    def http_long(self, model: str) -> str:
        """What the HTTP APIs do with `model`'s over-long inputs when a request does not say
        (its `http_long`; an unknown name is refused later, with its own error)."""
        slot = self.models.by_name.get(model)
        return slot.config.http_long if slot is not None else "error"

    async def preload(self, name: str) -> None:
        """Load a model before the daemon reports ready (the service manager's preload)."""
        await self.models.get(name).load(self.config.request_timeout, explicit=True)

    def _hello(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "protocol": PROTOCOL_VERSION,
            "server": f"embedd {__version__}",
            "pid": os.getpid(),
            "models": sorted(self.models.slots),
            # The limits a client must size itself by.
            "max_frame": cfg.max_frame,
            "max_inflight": cfg.max_inflight,
            "max_inputs": cfg.max_inputs,
            "max_response": cfg.max_response,
            "max_timeout": MAX_TIMEOUT,
            "request_timeout": cfg.request_timeout,
        }

    def snapshot(self) -> StatusSnapshot:
        slots = self.models.slots
        return StatusSnapshot(
            models_ready=tuple(n for n, s in slots.items() if s.state == "ready"),
            models_total=len(slots),
            queued_inputs=sum(s.worker.queued_inputs for s in slots.values() if s.worker),
        )

    def _health(self) -> dict[str, Any]:
        return {
            "status": "shutting_down" if self.draining else "ok",
            "uptime": round(time.monotonic() - self.started, 3),
            "models_ready": sum(1 for s in self.models.slots.values() if s.state == "ready"),
            # Models that cannot serve now, and why (a failed load, or one that kept crashing).
            "models_failed": {
                name: s.error for name, s in self.models.slots.items() if s.state == "failed"
            },
        }

    def stats(self) -> StatsAnswer:
        models: dict[str, ModelStats] = {}
        now = time.monotonic()
        for name, slot in self.models.slots.items():
            st = slot.stats
            w = slot.worker
            models[name] = ModelStats(
                state=slot.state,
                requests=st.requests,
                inputs=st.inputs,
                tokens=st.tokens,
                batches=st.batches,
                cancelled=st.cancelled,
                queue_inputs=w.queued_inputs if w else 0,
                queue_tokens=w.queued_tokens if w else 0,
                splitting_inputs=w.splitting_inputs if w else 0,
                chunking_inputs=w.chunking_inputs if w else 0,
                tokens_per_second=round(st.tokens_per_second, 1),
                throughput_measured=st.throughput_measured,
                busy_fraction=st.busy_fraction(now),
                threads=st.last_threads,
                replicas=[
                    ReplicaStats(
                        computing=r.computing,
                        threads=r.last_threads,
                        batches=r.batches,
                        busy_seconds=round(r.busy_seconds, 4),
                        busy_fraction=r.busy_fraction(now),
                    )
                    for r in (st.replicas if w is not None else ())
                ],
                bulk_overtook_queries=st.bulk_overtook_queries,
                queries_during_bulk=st.queries_during_bulk,
                latency_ms=st.latency_ms(),
                loads=slot.loads,
                unloads=slot.unloads,
                reranks=st.reranks,
                pairs=st.pairs,
                process=ProcessStats(
                    pid=w.pid if w else None,
                    rss_bytes=w.process_rss() if w else None,
                    starts=st.process_starts,
                    canaries=st.canaries,
                    crashes=st.crashes,
                    restarts=st.restarts,
                    poison_inputs_found=st.poison_found,
                    poison_inputs_refused=st.poison_refused,
                    poison_inputs_known=len(slot.poison),
                    boundary_us=st.boundary_us(),
                ),
                error=slot.error if slot.state == "failed" else None,
            )
        return StatsAnswer(
            uptime=round(time.monotonic() - self.started, 3),
            rss_bytes=read_rss_bytes(os.getpid()),
            connections=ConnectionStats(
                open=self.connections.open,
                total=self.connections.total,
                refused=self.connections.refused,
                timed_out=self.connections.timed_out,
            ),
            requests=RequestStats(
                total=self.tally.total, ok=self.tally.ok, errors=dict(self.tally.errors)
            ),
            models=models,
            cores=self.models.budget.snapshot(),
            cache=self.cache.stats(),
        )

    def _is_bulk(self, args: Embed, texts: list[str], max_tokens: int) -> bool:
        """The lane a request's work takes: the client's `priority` when it names one, else
        bulk for requests of more than `bulk_threshold` distinct texts, and for split requests
        with an input that may become several windows (a long document, not a query)."""
        if args.priority is not None:
            return args.priority == "bulk"
        if len(texts) > self.config.bulk_threshold:
            return True
        return args.long == "split" and any(estimate_tokens(t, None) > max_tokens for t in texts)

    async def _embed(
        self,
        args: Embed,
        owner: object,
        sizing: Sizing,
        reserve: Callable[[int], Awaitable[None]] | None,
    ) -> EmbedAnswer:
        slot = self.models.get(args.model)
        prefix = self.models.prompt_prefix(slot, args.prompt)
        timeout = args.timeout or self.config.request_timeout
        deadline = self.loop.time() + timeout
        info = await slot.load(timeout)
        if info.task == "rerank":
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"model {args.model!r} is a reranker (a cross-encoder): it scores query/"
                "document pairs with `rerank` and makes no vectors; embed with an embedding "
                "model",
                key="model",
            )
        # Checked here, before any work exists: the model's metadata is all it needs.
        dim = info.dim
        if args.dimensions is not None:
            if args.dimensions > info.dim:
                raise EmbeddError(
                    Code.BAD_REQUEST,
                    f"dimensions {args.dimensions} exceeds the model's {info.dim} dimensions",
                    key="dimensions",
                    limit=info.dim,
                )
            dim = args.dimensions
        limit = self.config.max_response
        size = sizing.check(len(args.input), dim, limit)
        split = args.long == "split"
        if split and args.overlap >= info.max_tokens // 2:
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"overlap must be less than half of the model's limit ({info.max_tokens // 2})",
                key="overlap",
                limit=info.max_tokens // 2,
            )

        async def compute(texts: list[str], indices: list[int]) -> EmbedResult:
            return await slot.embed(
                args,
                texts,
                prefix=prefix,
                indices=indices,
                bulk=self._is_bulk(args, texts, info.max_tokens),
                owner=owner,
                timeout=max(deadline - self.loop.time(), 0.001),
                timeout_reported=timeout,
            )

        if split and args.pool == "none":
            # Every window's vector and span: a variable number of vectors per input, so
            # never cached; the answer is sized by its windows before any work.
            windows = _windows(args, prefix, info.max_tokens)
            size = sizing.check(windows, dim, limit)
            if reserve is not None:
                await reserve(size)
            result = await compute(list(args.input), [])
            sizing.check(len(result.vectors), dim, limit)
            return _embed_answer(
                args, result.vectors, result, spans=[list(span) for span in result.spans]
            )
        if reserve is not None:
            await reserve(size)

        # Cache hits skip the model; identical texts within the request are computed once.
        keys = vector_keys(info, [prefix + text for text in args.input], args.options)
        use_cache = args.cache and self.cache.max_bytes > 0
        rows, todo = _from_cache(self.cache, keys, args.input, use_cache)

        if todo:
            unique = list(todo)
            computed = await compute(unique, [todo[t][0] for t in unique])
            if len(unique) == len(args.input):  # nothing cached, nothing repeated
                if use_cache:
                    for j, key in enumerate(keys):
                        self.cache.put(key, _entry(computed, j))
                return _embed_answer(args, computed.vectors, computed)
            for j, text in enumerate(unique):
                entry = _entry(computed, j)
                if use_cache:
                    self.cache.put(keys[todo[text][0]], entry)
                for i in todo[text]:
                    rows[i] = entry

        done = [r for r in rows if r is not None]
        assert len(done) == len(rows)
        matrix = np.stack([r.vector for r in done]) if done else np.empty((0, 0), np.float32)
        counts = EmbedResult(
            matrix,
            tokens=[r.tokens for r in done],
            truncated=[r.truncated for r in done],
            windows=[r.windows for r in done],
            spans=[],
        )
        return _embed_answer(args, matrix, counts)

    async def _rerank(
        self,
        args: Rerank,
        owner: object,
        reserve: Callable[[int], Awaitable[None]] | None,
    ) -> RerankAnswer:
        slot = self.models.get(args.model)
        timeout = args.timeout or self.config.request_timeout
        deadline = self.loop.time() + timeout
        info = await slot.load(timeout)
        if info.task != "rerank":
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"model {args.model!r} is an embedding model: it makes vectors with `embed` "
                "and scores no pairs; rerank with a reranker (a cross-encoder)",
                key="model",
            )
        size = self.answer_size(Request(0, args))
        if size > self.config.max_response:
            # Only documents echoed back (`return_documents`) can make it this large.
            limit = self.config.max_response
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"the answer would be about {size} bytes, more than max_response = {limit} "
                "bytes; send fewer documents, or leave return_documents off",
                key="documents",
                limit=limit,
            )
        if reserve is not None:
            await reserve(size)
        # Cache hits skip the model; a document sent twice is scored once.
        keys = rerank_keys(info, args.query, args.documents)
        use_cache = args.cache and self.cache.max_bytes > 0
        rows, todo = _from_cache(self.cache, keys, args.documents, use_cache)
        if todo:
            unique = list(todo)
            bulk = (
                args.priority == "bulk"
                if args.priority is not None
                else len(unique) > self.config.bulk_threshold
            )
            computed = await slot.rerank(
                args.query,
                unique,
                indices=[todo[d][0] for d in unique],
                bulk=bulk,
                owner=owner,
                timeout=max(deadline - self.loop.time(), 0.001),
                timeout_reported=timeout,
            )
            first = 0
            for j, doc in enumerate(unique):
                pieces = computed.windows[j]
                # A document scored in pieces scores as its best piece: the passage that
                # answers the query, wherever it stands in the document.
                score = computed.vectors[first : first + pieces, 0].max()
                first += pieces
                entry = Entry(np.asarray([score], np.float32), computed.tokens[j], False, pieces)
                if use_cache:
                    self.cache.put(keys[todo[doc][0]], entry)
                for i in todo[doc]:
                    rows[i] = entry
        done = [r for r in rows if r is not None]
        assert len(done) == len(rows)
        order = sorted(range(len(done)), key=lambda i: (-float(done[i].vector[0]), i))
        if args.top_n is not None:
            order = order[: args.top_n]
        return RerankAnswer(
            model=args.model,
            results=[
                RerankResult(
                    i,
                    float(done[i].vector[0]),
                    args.documents[i] if args.return_documents else None,
                )
                for i in order
            ],
            tokens=[r.tokens for r in done],
            pieces=[r.windows for r in done],
            usage=Usage(prompt_tokens=sum(r.tokens for r in done)),
        )

    async def _chunk(self, args: Chunk) -> ChunkAnswer:
        slot = self.models.get(args.model)
        info = await slot.load(self.config.request_timeout)
        limit = args.max_tokens or info.max_tokens
        if limit > info.max_tokens:
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"max_tokens {limit} exceeds the model's limit of {info.max_tokens}",
                key="max_tokens",
                limit=info.max_tokens,
            )
        if args.overlap >= limit // 2:
            raise EmbeddError(
                Code.BAD_REQUEST,
                f"overlap must be less than half of max_tokens ({limit // 2})",
                key="overlap",
                limit=limit // 2,
            )
        result = await slot.chunk(
            args.input, max_tokens=limit, overlap=args.overlap, timeout=self.config.request_timeout
        )
        return ChunkAnswer(
            model=args.model,
            chunks=[ChunkPart(c.text, c.start, c.end, c.tokens) for c in result.chunks],
            max_tokens=result.max_tokens,
        )

    async def _tokenize(self, args: Tokenize) -> TokenizeAnswer:
        slot = self.models.get(args.model)
        prefix = self.models.prompt_prefix(slot, args.prompt)
        texts = [prefix + t for t in args.input]
        # The model's coordinator stops tokenizing once the ids would not fit the answer.
        per_id = TOKEN_PIECE_JSON_BYTES if args.pieces else _BYTES_PER_TOKEN_ID
        result = await slot.tokenize(
            texts,
            self.config.request_timeout,
            max_ids=self.config.max_response // per_id,
            pieces=args.pieces,
        )
        info = slot.last_info
        return TokenizeAnswer(
            model=args.model,
            ids=result.ids,
            counts=result.counts,
            max_tokens=info.max_tokens if info else None,
            pieces=result.pieces,
        )


def _from_cache(
    cache: VectorCache, keys: Sequence[CacheKey], texts: Sequence[str], use: bool
) -> tuple[list[Entry | None], dict[str, list[int]]]:
    """Each text's cached entry (None where the model must compute it), and the texts left to
    compute with the positions each fills: a text sent twice is computed once."""
    rows: list[Entry | None] = [None] * len(texts)
    todo: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        entry = cache.get(key) if use else None
        if entry is not None:
            rows[i] = entry
        else:
            todo.setdefault(texts[i], []).append(i)
    return rows, todo


def _embed_answer(
    args: Embed,
    vecs: npt.NDArray[np.float32],
    result: EmbedResult,
    spans: list[list[int]] | None = None,
) -> EmbedAnswer:
    return EmbedAnswer(
        model=args.model,
        vectors=vecs,
        tokens=result.tokens,
        truncated=result.truncated,
        windows=result.windows,
        usage=Usage(prompt_tokens=sum(result.tokens)),
        spans=spans,
        precision=args.precision,
    )


def _windows(args: Embed, prefix: str, max_tokens: int) -> int:
    """How many window vectors a long="split", pool="none" answer will hold, at most (by
    admission's over-estimate of tokens per byte)."""
    return sum(estimate_windows(prefix + t, max_tokens, args.overlap) for t in args.input)


def _entry(result: EmbedResult, j: int) -> Entry:
    """The cache's entry for the j-th input of a result (one vector per input)."""
    return Entry(result.vectors[j], result.tokens[j], result.truncated[j], result.windows[j])
