"""What the event loop hands a model thread, and what the thread hands back: typed both ways.

A job carries the typed request it serves (`wire.messages.Embed`), so the options a client sent
reach the thread under their one name, and the thread answers with a typed result. The loop
builds jobs in one place (`models.ModelSlot`); the thread fills in the fields marked as its
own; results cross back through the job's asyncio future, completed with
`call_soon_threadsafe`, so the loop never waits on inference.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from ..wire.answers import TokenPiece
from ..wire.errors import EmbeddError
from ..wire.messages import Embed
from .chunking import TextPiece

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class EmbedResult:
    """Per input (or, for `pool="none"`, per window): its vector (cut to `dimensions` and
    normalised as asked), and per input its token count, whether it was cut, how many windows
    it became, and each window's character span."""

    vectors: npt.NDArray[np.float32]
    tokens: list[int]
    truncated: list[bool]
    windows: list[int]
    spans: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    ids: list[list[int]]
    # Each text's tokens with their texts and spans, when asked for and known.
    pieces: list[list[TokenPiece]] | None = None

    @property
    def counts(self) -> list[int]:
        return [len(i) for i in self.ids]


@dataclass(frozen=True, slots=True)
class ChunkPiece:
    text: str
    start: int
    end: int
    # Tokens the piece takes as an input of its own, the model's special frame included.
    tokens: int


@dataclass(frozen=True, slots=True)
class ChunkResult:
    chunks: list[ChunkPiece]
    max_tokens: int


@dataclass(eq=False)
class Job(Generic[R]):
    """One request's work. `cancelled` is set by the loop and read by the thread: a stale read
    only means one more batch computes inputs nobody will read."""

    texts: list[str]
    future: asyncio.Future[R]
    loop: asyncio.AbstractEventLoop
    # Whose turn it is when batching (the connection), and which lane the work takes.
    owner: object = None
    bulk: bool = False
    cancelled: bool = False
    # perf_counter() when submitted, and when its first batch started (latency figures).
    submitted: float = 0.0
    started: float | None = None
    # Set by the model's coordinating thread when it answers (vectors of a batch still being
    # computed for an answered job are dropped).
    answered: bool = False

    def resolve(self, result: R | EmbeddError) -> None:
        self.answered = True
        self.loop.call_soon_threadsafe(settle, self.future, result)


@dataclass(eq=False)
class EmbedJob(Job[EmbedResult]):
    """`texts` are the request's distinct inputs without the prompt; `prefix` is the prompt,
    given to each input (or to each window of a split input)."""

    request: Embed = field(default_factory=Embed)
    prefix: str = ""
    # Where each text stands in the client's request, so that errors name the client's index.
    indices: list[int] = field(default_factory=list)
    # The model thread's own, filled in as it works: token ids per sequence (one per input, or
    # per window), and per input its sequences' indices in `tokens` and their spans.
    tokens: list[list[int]] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    vectors: npt.NDArray[np.float32] | None = None
    remaining: int = 0
    # long="split", the model thread's own: the input being cut, where cutting stands, and its
    # windows so far (start, end, token ids).
    split_next: int = 0
    split_cursor: Iterator[TextPiece] | None = None
    split_windows: list[tuple[int, int, list[int]]] = field(default_factory=list)

    def index(self, i: int) -> int:
        """The client's index of this job's i-th text."""
        return self.indices[i] if self.indices else i


# What a rerank job asks of the machinery an embed job runs on: every piece of a document is
# computed and kept (its score row), nothing is pooled or normalised in the model thread.
RERANK_REQUEST = Embed(long="split", pool="none", normalize=False)


@dataclass(eq=False)
class RerankJob(EmbedJob):
    """Scoring `texts` (a request's distinct documents) against `query` with a cross-encoder.
    It runs as an embed job does, queued, batched and retried alike: each document becomes one
    or more query/document pairs (a document too long for the model is cut into pieces by the
    `long="split"` rules), each pair one sequence, and its output row the classifier's scores;
    the answer holds every pair's row, grouped by document, and the caller takes each
    document's best piece."""

    query: str = ""
    # The model thread's own: the query's ids, without special tokens.
    query_ids: list[int] = field(default_factory=list)


@dataclass(eq=False)
class TokenizeJob(Job[TokenizeResult]):
    """`texts` with the prompt already prepended (a count is of what the model would see).
    More than `max_ids` ids in all (what `max_response` holds) is refused as soon as it is
    known, without tokenizing the rest."""

    max_ids: int | None = None
    # Each token's text and span too (`ModelTokenizer.pieces`).
    pieces: bool = False


@dataclass(eq=False)
class ChunkJob(Job[ChunkResult]):
    """Cutting one text into chunks, a slice at a time between batches, so that a 10 MB text
    never holds up the queries waiting for this model."""

    max_tokens: int | None = None
    overlap: int = 0
    # The model thread's own: the pieces so far, and where cutting stands.
    pieces: list[ChunkPiece] = field(default_factory=list)
    cursor: Iterator[TextPiece] | None = None


def settle(future: asyncio.Future[R], result: R | EmbeddError) -> None:
    """Complete a future on the loop, unless the waiter gave up meanwhile (timeout, cancel)."""
    if future.done():
        return
    if isinstance(result, EmbeddError):
        future.set_exception(result)
    else:
        future.set_result(result)


def settle_failed(future: asyncio.Future[R], exc: BaseException) -> None:
    """Fail a future nobody may be awaiting (a load that failed): the error also reaches the
    jobs, so marking it retrieved keeps asyncio from logging it as never retrieved."""
    if not future.done():
        future.set_exception(exc)
        future.exception()
