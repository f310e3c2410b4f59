"""The daemon's answers as typed values, which each front encodes in its own way.

`Daemon.handle` returns one of these; the msgpack socket turns it into the map PROTOCOL.md
documents (`to_wire`), and the HTTP front writes its JSON straight from the same values (an
embedding answer's vectors as a numpy array, never packed to bytes and read back). They live
here, below both fronts and the daemon, so that each may name them.

`Sizing` is how a front measures an embedding answer: the daemon refuses one larger than
`max_response` as soon as it knows the model's dimension, before any work, by the front's own
bytes per vector component.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from . import precision as compact
from .errors import Code, EmbeddError


@dataclass(frozen=True)
class Sizing:
    """An embedding answer's size by the vectors it holds: `float_bytes` per component,
    `row_bytes` per vector and `fixed_bytes` once."""

    float_bytes: float
    row_bytes: int = 0
    fixed_bytes: int = 0
    # What the size counts, and what a refused client can do instead (both in the refusal).
    unit: str = "bytes"
    advice: str = "send fewer inputs per request (or fewer dimensions)"

    def size(self, rows: int, dim: int) -> int:
        return self.fixed_bytes + rows * (self.row_bytes + math.ceil(dim * self.float_bytes))

    def refusal(self, size: int, limit: int) -> EmbeddError:
        return EmbeddError(
            Code.BAD_REQUEST,
            f"the answer would be about {size} {self.unit}, more than max_response = {limit} "
            f"bytes; {self.advice}",
            key="input",
            limit=limit,
        )

    def check(self, rows: int, dim: int, limit: int) -> int:
        """The answer's size, or the refusal when it is over `limit`."""
        size = self.size(rows, dim)
        if size > limit:
            raise self.refusal(size, limit)
        return size


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int


@dataclass(frozen=True)
class EmbedAnswer:
    model: str
    # One float32 row per input (or per window, for long="split" with pool="none").
    vectors: npt.NDArray[np.float32]
    tokens: list[int]
    truncated: list[bool]
    windows: list[int]
    usage: Usage
    # Each window's [start, end] in its input, for pool="none" answers only.
    spans: list[list[int]] | None = None
    # How the vectors are given to the client (precision.py); `vectors` stay float32.
    precision: str = "float32"

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    def compact(self) -> npt.NDArray[Any]:
        """The vectors in the answer's precision (float32, float16, or packed signs)."""
        return compact.quantize(self.vectors, self.precision)

    def packed_bytes(self) -> bytes:
        """The vectors as the bytes of `encoding: "f32"`: the precision's little-endian
        elements, row-major."""
        return compact.to_bytes(self.vectors, self.precision)

    def wire_list(self) -> list[list[Any]]:
        """The vectors as `encoding: "list"` sends them: floats, or each packed byte an int."""
        rows: list[list[Any]] = self.compact().tolist()
        return rows

    def to_wire(self, encoding: str, embeddings: Any = None) -> dict[str, Any]:
        """The msgpack answer; `embeddings`: the vectors already encoded (a large `list` is
        built off the event loop by the caller), else they are encoded here."""
        if embeddings is None:
            embeddings = self.packed_bytes() if encoding == "f32" else self.wire_list()
        out = {
            "model": self.model,
            "dim": self.dim,
            "count": self.count,
            "encoding": encoding,
            "precision": self.precision,
            "embeddings": embeddings,
            "tokens": self.tokens,
            "truncated": self.truncated,
            "windows": self.windows,
            "usage": asdict(self.usage),
        }
        if self.spans is not None:
            out["spans"] = self.spans
        return out


# The JSON of one token with its span, beside its text (the HTTP front's TEI /tokenize):
# {"id":30521,"text":"","special":false,"start":1048576,"stop":1048580}, with room. The
# daemon bounds such a request's tokens by it and max_response.
TOKEN_PIECE_JSON_BYTES = 96


@dataclass(frozen=True)
class TokenPiece:
    """One token with what it stands for: the bytes [start, end) of the UTF-8 text it came
    from, and that text (None for the special frame the model adds, whose text is the
    token's own), and whether it is a special token."""

    id: int
    text: str
    special: bool
    start: int | None
    end: int | None


@dataclass(frozen=True)
class TokenizeAnswer:
    model: str
    ids: list[list[int]]
    counts: list[int]
    max_tokens: int | None
    # Each text's tokens with their texts and spans, when the HTTP front asked for them and
    # the model's vocabulary is one embedd tokenizes itself (WordPiece); never on the wire.
    pieces: list[list[TokenPiece]] | None = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "ids": self.ids,
            "counts": self.counts,
            "max_tokens": self.max_tokens,
        }


@dataclass(frozen=True)
class ChunkPart:
    text: str
    start: int
    end: int
    tokens: int


@dataclass(frozen=True)
class ChunkAnswer:
    model: str
    chunks: list[ChunkPart]
    max_tokens: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "chunks": [
                {"text": c.text, "span": [c.start, c.end], "tokens": c.tokens} for c in self.chunks
            ],
            "max_tokens": self.max_tokens,
        }


@dataclass(frozen=True)
class RerankResult:
    """One document's place in a rerank answer: its index in the request, its score (the
    cross-encoder's raw logit, its best piece's for a document scored in pieces), and the
    document itself when the request asked for it."""

    index: int
    score: float
    document: str | None = None


@dataclass(frozen=True)
class RerankAnswer:
    model: str
    # Best first; `top_n` of them when the request set it.
    results: list[RerankResult]
    # Per document, in the request's order: its pairs' tokens, and how many pieces it was
    # scored in (1 unless it was longer than the model's window beside the query).
    tokens: list[int]
    pieces: list[int]
    usage: Usage

    def to_wire(self) -> dict[str, Any]:
        results = []
        for r in self.results:
            item: dict[str, Any] = {"index": r.index, "score": r.score}
            if r.document is not None:
                item["document"] = r.document
            results.append(item)
        return {
            "model": self.model,
            "results": results,
            "tokens": self.tokens,
            "pieces": self.pieces,
            "usage": asdict(self.usage),
        }


# --- stats: each part's fields are its keys on the wire (PROTOCOL.md, stats) ------------------


@dataclass(frozen=True)
class ConnectionStats:
    open: int
    total: int
    refused: int
    timed_out: int


@dataclass(frozen=True)
class RequestStats:
    total: int
    ok: int
    errors: dict[str, int]


@dataclass(frozen=True)
class ReplicaStats:
    computing: bool
    threads: int
    batches: int
    busy_seconds: float
    busy_fraction: float


@dataclass(frozen=True)
class ProcessStats:
    pid: int | None
    rss_bytes: int | None
    starts: int
    canaries: int
    crashes: int
    restarts: int
    poison_inputs_found: int
    poison_inputs_refused: int
    poison_inputs_known: int
    boundary_us: dict[str, float]


@dataclass(frozen=True)
class ModelStats:
    state: str
    requests: int
    inputs: int
    tokens: int
    batches: int
    cancelled: int
    queue_inputs: int
    queue_tokens: int
    splitting_inputs: int
    chunking_inputs: int
    tokens_per_second: float
    throughput_measured: bool
    busy_fraction: float
    threads: int
    replicas: list[ReplicaStats]
    bulk_overtook_queries: int
    queries_during_bulk: int
    latency_ms: dict[str, dict[str, float]]
    loads: int
    unloads: int
    # Rerank requests (also in `requests`) and the query/document pairs they were computed as.
    reranks: int
    pairs: int
    # The model process: llama.cpp runs there, never in the daemon.
    process: ProcessStats
    # Why a failed model cannot serve; the key is present only then.
    error: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out = asdict(self)
        if self.error is None:
            del out["error"]
        return out


@dataclass(frozen=True)
class StatsAnswer:
    uptime: float
    rss_bytes: int | None
    connections: ConnectionStats
    requests: RequestStats
    models: dict[str, ModelStats]
    # The core budget every model's replicas share.
    cores: dict[str, Any]
    cache: dict[str, int]

    def to_wire(self) -> dict[str, Any]:
        return {
            "uptime": self.uptime,
            "rss_bytes": self.rss_bytes,
            "connections": asdict(self.connections),
            "requests": asdict(self.requests),
            "models": {name: m.to_wire() for name, m in self.models.items()},
            "cores": self.cores,
            "cache": self.cache,
        }


@dataclass(frozen=True)
class MapAnswer:
    """An answer that is its map as it stands (hello, health, models, load, unload, shutdown)."""

    values: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return dict(self.values)


Answer = EmbedAnswer | TokenizeAnswer | ChunkAnswer | RerankAnswer | StatsAnswer | MapAnswer
