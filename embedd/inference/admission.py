"""Whether a model's queue takes a request now: pure bookkeeping, no I/O, no clock.

Rules (so that one big request cannot make every search `busy`):
- a request is counted by what it can really cost: each text at most the model's `max_tokens`
  (a longer one is cut, or refused with `input_too_long`, never computed whole), so one giant
  text cannot inflate the count; but a text split into windows (`long="split"`) is computed
  whole, and counts whole;
- interactive and bulk work have separate budgets of `max_queue_tokens` each: no amount of
  queued bulk work makes a search `busy`;
- within bulk, one connection (owner) may hold at most `BULK_SHARE` of the budget, so a single
  client cannot take the whole queue; a single request larger than that share is refused at
  once, telling the client to send it in parts;
- `retry_after` comes from a throughput measured on well-filled batches (small batches would
  make it look slow: 7,494 s was seen), and is capped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..wire.errors import Code, EmbeddError

# The part of the bulk budget one connection may hold: two indexers can always both progress.
BULK_SHARE = 0.5
# Longest `retry_after` suggested: beyond half a minute the estimate means little, and a client
# retrying then meets a queue that has changed anyway.
MAX_RETRY_AFTER = 30.0
MIN_RETRY_AFTER = 0.05
# Bytes per token assumed before tokenizing: WordPiece and BPE vocabularies average well over
# 3 bytes per token on prose, so bytes / 3 errs on the side of counting more.
BYTES_PER_TOKEN_ESTIMATE = 3
# Special tokens counted per text before the model's own frame is known.
FRAME_ESTIMATE = 2


def estimate_tokens(text: str, max_tokens: int | None) -> int:
    """Tokens a text will cost before it is tokenized: at most `max_tokens` when a longer
    text is cut or refused, every one of them (None) when it is split into windows."""
    n = len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN_ESTIMATE + FRAME_ESTIMATE
    return n if max_tokens is None else min(n, max_tokens)


def estimate_windows(text: str, max_tokens: int, overlap: int) -> int:
    """Windows a text becomes with long="split", before it is tokenized (by the same
    over-estimate of its tokens), so that an answer of every window's vector is sized before
    any work."""
    tokens = estimate_tokens(text, None)
    if tokens <= max_tokens:
        return 1
    step = max(1, max_tokens - FRAME_ESTIMATE - overlap)
    return -(-(tokens - FRAME_ESTIMATE - overlap) // step)


@dataclass
class Admission:
    max_queue_tokens: int
    queued: Counter[bool] = field(default_factory=Counter)  # by lane: bulk or not
    by_owner: Counter[object] = field(default_factory=Counter)  # bulk tokens per owner

    @property
    def share(self) -> int:
        return max(1, int(self.max_queue_tokens * BULK_SHARE))

    def check(
        self, tokens: int, *, bulk: bool, owner: object, tokens_per_second: float
    ) -> EmbeddError | None:
        """None if the request may queue now; else why not (`busy`)."""
        limit = self.max_queue_tokens
        if bulk and tokens > self.share:
            return EmbeddError(
                Code.BUSY,
                f"this request counts {tokens} tokens, more than one connection's share of "
                f"the bulk queue ({self.share} of max_queue_tokens {limit}); send it in parts",
                limit=self.share,
            )
        lane = self.queued[bulk]
        if lane and lane + tokens > limit:
            return self._busy(lane + tokens - limit, limit, tokens_per_second, "the queue")
        mine = self.by_owner[owner] if bulk else 0
        if bulk and mine and mine + tokens > self.share:
            what = "this connection's share of the bulk queue"
            return self._busy(mine + tokens - self.share, self.share, tokens_per_second, what)
        return None

    @staticmethod
    def _busy(excess: int, limit: int, tokens_per_second: float, what: str) -> EmbeddError:
        wait = excess / max(tokens_per_second, 1.0)
        retry = round(min(MAX_RETRY_AFTER, max(MIN_RETRY_AFTER, wait)), 3)
        return EmbeddError(
            Code.BUSY,
            f"{what} is full ({limit} tokens); retry in about {retry:g}s",
            retry_after=retry,
            limit=limit,
        )

    def add(self, tokens: int, *, bulk: bool, owner: object) -> None:
        self.queued[bulk] += tokens
        if bulk:
            self.by_owner[owner] += tokens

    def remove(self, tokens: int, *, bulk: bool, owner: object) -> None:
        self.queued[bulk] -= tokens
        if bulk:
            self.by_owner[owner] -= tokens
            if self.by_owner[owner] <= 0:
                del self.by_owner[owner]
