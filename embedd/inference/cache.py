"""An LRU of computed vectors, bounded in bytes, shared by every client.

Apps re-embed the same texts all the time (a document re-indexed after a small edit, the same
query typed twice); a hit skips the model entirely. The key holds everything that changes the
vector: the model file's content fingerprint (so replacing the file under the same name can
never serve stale vectors), the tokenizer that made its ids (a fixed tokenizer must not serve the
vectors of the old one), the exact text sent to the model (the prompt prefix included), and
the request's `VectorOptions`. `vector_key` is the one place that says what a key holds: two
models on the same file with different pooling or `max_tokens` never share.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..wire.options import VectorOptions


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Everything that changes a vector. `text` is what the model sees (prompt included)."""

    fingerprint: str
    max_tokens: int
    pooling: str
    # Which tokenizer made the ids (engine.ModelInfo.tokenizer, e.g. "wordpiece-hf-1").
    tokenizer: str
    text: str
    # Without the prompt's name: its prefix is in `text`, which is what the model reads.
    options: VectorOptions


def vector_keys(
    model: ModelIdentity, texts: Sequence[str], options: VectorOptions
) -> list[CacheKey]:
    """The key of each text's vector, the texts as the model sees them (prompt included)."""
    unnamed = dataclasses.replace(options, prompt=None)
    identity = (model.fingerprint, model.max_tokens, model.pooling, model.tokenizer)
    return [CacheKey(*identity, text, unnamed) for text in texts]


# The options of a cached rerank score: no embed request that is cached ever has them
# (long="split" with pool="none" is never cached), and a reranker embeds nothing anyway.
RERANK_OPTIONS = VectorOptions(long="split", pool="none", normalize=False)


def rerank_keys(model: ModelIdentity, query: str, documents: Sequence[str]) -> list[CacheKey]:
    """The key of each document's score against `query`: the pair written with the query's
    length first, so that no other query and document spell the same key."""
    return vector_keys(model, [f"{len(query)}:{query}{doc}" for doc in documents], RERANK_OPTIONS)


def vector_key(model: ModelIdentity, text: str, options: VectorOptions) -> CacheKey:
    return vector_keys(model, [text], options)[0]


class ModelIdentity(Protocol):
    """What of a loaded model goes into its vectors' keys (engine.ModelInfo has it)."""

    @property
    def fingerprint(self) -> str: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def pooling(self) -> str: ...
    @property
    def tokenizer(self) -> str: ...


# Rough per-entry bookkeeping (dict slot, tuple, numpy header), so that many tiny entries are
# not counted as free.
_ENTRY_OVERHEAD = 200


@dataclass(frozen=True, slots=True)
class Entry:
    vector: npt.NDArray[np.float32]
    tokens: int
    truncated: bool
    windows: int = 1


class VectorCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()

    @staticmethod
    def _size(key: CacheKey, entry: Entry) -> int:
        # Bytes, not characters: the text is held as a str, which for non-ASCII text costs up to
        # four bytes a character.
        return entry.vector.nbytes + len(key.text.encode("utf-8", "replace")) + _ENTRY_OVERHEAD

    def get(self, key: CacheKey) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: CacheKey, entry: Entry) -> None:
        size = self._size(key, entry)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= self._size(key, old)
        self._entries[key] = entry
        self.bytes += size
        while self.bytes > self.max_bytes:
            k, e = self._entries.popitem(last=False)
            self.bytes -= self._size(k, e)
            self.evictions += 1

    def stats(self) -> dict[str, int]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "entries": len(self._entries),
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "evictions": self.evictions,
        }
