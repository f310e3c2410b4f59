"""Which request options change a vector: the one statement of them.

An `embed` request's options (`wire.messages.Embed`), the daemon's cache key
(`inference.cache.CacheKey`), the chunk ids `embedd index` stores and the ones `embedd.ray`
writes all take their options from `VectorOptions`, so two ways of asking for the same vector
(`truncate: true` and `long: "truncate"`) are one value, and what is hashed into a chunk id is
what is sent. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

# What happens to an input longer than the model's limit: refused, cut, or split in windows.
Long = Literal["error", "truncate", "split"]
LONG_MODES: tuple[Long, ...] = get_args(Long)
# How a split input's windows become vectors: their token-weighted mean, or one vector each.
Pool = Literal["mean", "none"]
POOLS: tuple[Pool, ...] = get_args(Pool)


@dataclass(frozen=True, kw_only=True)
class VectorOptions:
    """The options of an `embed` request that change its vectors (PROTOCOL.md, `embed`); the
    model's own identity (its file's fingerprint, its tokenizer, pooling and limit) is the
    other half of what a vector depends on. Settings that cannot matter are dropped, so that
    equal vectors have equal options: `overlap` and `pool` apply to `long="split"` only."""

    long: Long = "error"
    overlap: int = 0
    pool: Pool = "mean"
    prompt: str | None = None
    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if self.long != "split":
            object.__setattr__(self, "overlap", 0)
            object.__setattr__(self, "pool", "mean")

    def id_fields(self) -> dict[str, Any]:
        """The options as a chunk id hashes them and Parquet metadata records them. `pool` is
        left out while it is "mean", the only pooling that gives one vector per chunk, so the
        ids an index or an output already holds stay the ids of the same chunks."""
        fields: dict[str, Any] = {
            "long": self.long,
            "overlap": self.overlap,
            "prompt": self.prompt,
            "normalize": self.normalize,
            "dimensions": self.dimensions,
        }
        if self.pool != "mean":
            fields["pool"] = self.pool
        return fields

    def request(self) -> dict[str, Any]:
        """The `embed` request's keys that ask for exactly these options (defaults left out,
        as a client sends them)."""
        args: dict[str, Any] = {"long": self.long, "normalize": self.normalize}
        if self.overlap:
            args["overlap"] = self.overlap
        if self.pool != "mean":
            args["pool"] = self.pool
        if self.prompt is not None:
            args["prompt"] = self.prompt
        if self.dimensions is not None:
            args["dimensions"] = self.dimensions
        return args
