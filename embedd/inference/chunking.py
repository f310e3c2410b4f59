"""Cutting text into pieces that fit a model, at the best boundaries: a pure algorithm over a
token-counting function (the model's own tokenizer in the daemon, anything in the tests).

Each chunk is the longest stretch from the current position whose tokens fit the budget and
that ends at a paragraph break, else at a sentence end, else between words; only a "word" that
alone exceeds the budget (a long URL, a base64 blob) is cut inside, at the last character that
fits. A boundary level is taken once it fills at least half the budget (so a short heading does
not become a chunk of its own when sentences would fill it). Chunks overlap by up to `overlap`
tokens, starting at a word boundary. Spans index the original text, so `text[start:end]` is
exactly the chunk. Deterministic: the same text and counter give the same chunks.

Counting is done on candidate prefixes found by binary search over the boundaries of a bounded
window, never on the whole text, so a long text costs a few tokenizer calls per chunk and can
be consumed a slice at a time (`iter_chunks` is a generator).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Counter = Callable[[str], int]

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
# Sentence ends: ASCII and CJK full stops, question and exclamation marks.
_SENTENCE = re.compile("(?<=[.!?\u3002\uff01\uff1f])\\s+")
_WORD = re.compile(r"\s+")
# Characters a window may span per token of budget: no token of a real vocabulary is longer
# than a few dozen characters; the engine passes its own vocabulary's longest piece.
DEFAULT_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class TextPiece:
    """A span of the text, [start, end) in characters, and how many tokens it holds."""

    start: int
    end: int
    tokens: int  # bare tokens (without the model's special frame)


def _ends(pattern: re.Pattern[str], text: str, lo: int, hi: int) -> list[int]:
    """Positions in (lo, hi] where a piece may end at this level (before the separator)."""
    out = [m.start() for m in pattern.finditer(text, lo, hi) if m.start() > lo]
    if hi == len(text):
        out.append(hi)
    return out


def _starts(text: str, lo: int, hi: int) -> list[int]:
    """Positions in (lo, hi) where a word starts."""
    return [m.end() for m in _WORD.finditer(text, lo, hi) if lo < m.end() < hi]


def _best(text: str, pos: int, ends: list[int], budget: int, count: Counter) -> tuple[int, int]:
    """The largest end in `ends` whose piece fits (binary search), with its count; (pos, 0)
    if none does. Token counts grow with the end, which is what makes the search valid."""
    lo, hi, best = 0, len(ends) - 1, (pos, 0)
    while lo <= hi:
        mid = (lo + hi) // 2
        n = count(text[pos : ends[mid]])
        if n <= budget:
            best = (ends[mid], n)
            lo = mid + 1
        else:
            hi = mid - 1
    return best


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def iter_chunks(
    text: str,
    count: Counter,
    budget: int,
    *,
    overlap: int = 0,
    chars_per_token: int = DEFAULT_CHARS_PER_TOKEN,
) -> Iterator[TextPiece]:
    """Chunks of at most `budget` bare tokens covering `text` (whitespace, and stretches with no
    tokens at all, between them aside), each overlapping the previous one by at most `overlap`
    tokens."""
    if budget < 1:
        raise ValueError("budget must be at least one token")
    overlap = max(0, min(overlap, budget // 2))
    window = (budget + 16) * chars_per_token
    pos = _skip_space(text, 0)
    while pos < len(text):
        hi = min(len(text), pos + window)
        best = (pos, 0)
        for pattern in (_PARAGRAPH, _SENTENCE, _WORD):
            found = _best(text, pos, _ends(pattern, text, pos, hi), budget, count)
            if found[0] > best[0]:
                best = found
            if best[1] * 2 >= budget or (best[0] == len(text) and best[1]):
                break
        end, n = best
        if end == pos:
            # Not even one word fits: cut inside it, at the last character that does.
            end, n = _best(text, pos, list(range(pos + 1, hi + 1)), budget, count)
            end = max(end, pos + 1)
            n = n or count(text[pos:end])
        if n == 0:
            # Only characters the tokenizer deletes (zero-width joiners, soft hyphens, lone
            # marks): not a chunk. Embedded, it would be the bare special frame's vector, and
            # averaged into a split input's it pulls the vector towards that one.
            pos = _skip_space(text, end)
            continue
        chunk_end = end
        while chunk_end > pos and text[chunk_end - 1].isspace():
            chunk_end -= 1
        yield TextPiece(pos, chunk_end, n)
        next_pos = _skip_space(text, end)
        if overlap and next_pos < len(text):
            starts = _starts(text, pos, chunk_end)
            # The earliest word start whose tail of this chunk fits in `overlap` tokens.
            lo, hi_i, back = 0, len(starts) - 1, next_pos
            while lo <= hi_i:
                mid = (lo + hi_i) // 2
                if count(text[starts[mid] : chunk_end]) <= overlap:
                    back = starts[mid]
                    hi_i = mid - 1
                else:
                    lo = mid + 1
            next_pos = back if back > pos else next_pos
        pos = next_pos


def chunk_text(
    text: str, count: Counter, budget: int, *, overlap: int = 0, chars_per_token: int = 32
) -> list[TextPiece]:
    return list(iter_chunks(text, count, budget, overlap=overlap, chars_per_token=chars_per_token))


def spans_cover(text: str, chunks: list[TextPiece]) -> bool:
    """Whether every non-space character of `text` lies in some chunk (a test helper's rule,
    kept here beside the algorithm it checks)."""
    starts = [c.start for c in chunks]
    for i, ch in enumerate(text):
        if ch.isspace():
            continue
        k = bisect.bisect_right(starts, i) - 1
        if k < 0 or not any(c.start <= i < c.end for c in chunks[max(0, k - 4) : k + 1]):
            return False
    return True
