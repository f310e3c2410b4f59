"""Ranked lists of chunks in, ranked passages out (pure: no I/O, no model).

Each list (cosine to the query, BM25 over the words) ranks chunks by its own scale. Fusion:

1. Each list's scores are put on one scale: how many standard deviations a chunk's score
   stands above the list's mean (`normalised`), so a clear first place in one list carries
   a large vote on its own, and a list whose scores are flat (vectors for a bare identifier)
   gives little to anyone. A chunk absent from a list gets 0 from it; a BM25 list shorter
   than the others names every chunk holding a query word, and the chunks it leaves out
   count in its mean and spread as scoring 0 (ZERO_FLOORED). The lists are weighted by the
   query's shape (`weights_for`): vectors count more for a question in words, BM25 for
   identifiers, flags and error codes.
2. Near-duplicate chunks (the same paragraph in the copies of a changelog that several
   packages ship, a copy with a line changed) are folded into one unit: they share
   NEAR_DUPLICATE or more of the larger one's word shingles. A unit takes each list's best
   vote among its members, is shown at its most specific member (from the file with the
   fewest chunks: the document itself rather than a long file holding it), and says how
   many similar chunks it stands for.
3. Votes are gathered per passage: a unit also takes NEIGHBOUR_SHARE of each list's vote for
   the chunks next to it in its file, so an answer whose words one list found in one chunk
   and whose meaning the other found in the next gets both votes.
4. Text that recurs across BOILERPLATE_FILES or more files among the candidates (licence
   paragraphs quoted in copyright files) is boilerplate, except in the chunk of the smallest
   file holding it (the licence itself): a unit loses BOILERPLATE_WEIGHT of its score times
   the share of its shingles that are quoted boilerplate.
5. The fused score is the weighted sum of the votes; a chunk next to a better-ranked unit of
   the same file is folded into it (one passage is one hit).

The rules, their constants and why: docs/search.md ("How hybrid ranking works").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Key = tuple[str, int]  # (file, chunk index)

# Names of the lists fusion knows; other names are accepted with weight 1.
VECTOR = "vector"
BM25 = "bm25"
# Lists whose every unlisted chunk scored 0: BM25 names only the chunks that hold a query
# word. (A cosine list names the best of all chunks; those it leaves out scored something.)
ZERO_FLOORED = frozenset({BM25})
# The weight of each list's vote in the fused score when no query says otherwise.
WEIGHTS: Mapping[str, float] = {VECTOR: 1.0, BM25: 1.0}
# The vectors' weight (BM25's is 1) for a query in plain words and for one made of
# identifiers (`weights_for`). Chosen on the tuning half of the shipped relevance set
# (tests/data/relevance/packages.json); docs/search.md has the figures.
PROSE_VECTOR_WEIGHT = 3.0
IDENTIFIER_VECTOR_WEIGHT = 0.25
# Words per shingle: three words in a row are rare enough to say two chunks share a passage,
# short enough that a re-wrapped or lightly edited copy still shares most of them.
SHINGLE_WORDS = 3
# Shingles kept per chunk (its first ones): bounds the work of comparing candidates (a chunk
# holds a few hundred words at the bundled model's 256-token limit).
MAX_SHINGLES = 512
# Chunks with fewer shingles than this are never folded: a line or two says too little to
# call two chunks copies of each other.
MIN_SHINGLES = 8
# Shingles two chunks share, as a share of the larger one's, for them to be near duplicates:
# high enough that two releases' entries of one changelog (same phrasing, other versions and
# numbers) and a licence quoted inside a longer text stay apart, low enough that a copy with
# a changed line folds.
NEAR_DUPLICATE = 0.8
# Share of the best vote a list gives a chunk for its neighbour in the same file.
NEIGHBOUR_SHARE = 0.5
# Files a shingle must recur in (among the candidates) to count as boilerplate, and the share
# of its score a chunk made wholly of boilerplate loses.
BOILERPLATE_FILES = 4
BOILERPLATE_WEIGHT = 0.5
# A chunk with less than this share of quoted boilerplate is not boilerplate: a licence's
# name or a "see the changelog" line inside real text says nothing against it.
BOILERPLATE_MIN = 0.25
# Candidates fused at most per query: each list brings its top few hundred (the caller's
# limit); this bounds the work whatever the caller passes.
MAX_CANDIDATES = 1000
# Candidates (the best by their own votes) whose texts are compared for near duplicates and
# boilerplate: copies of a chunk have its scores, so they rank beside it, and a chunk below
# the first hundred does not reach a page of results whatever folding does above it. It
# bounds the text work of a query to about a hundred chunks of a few hundred words.
COMPARED = 100

# A word of a query that names something rather than says something: it holds a digit or an
# underscore, starts with a dash (a flag), has a dash, dot, slash, @, = or colon inside
# (a file, a version, a key=value, an error code), or capitals after its first letter
# (camelCase, an acronym such as HSTS).
_IDENTIFIER = re.compile(r"[0-9_]|^-|\w[-./@=:]\w|^.+[A-Z]")
# Punctuation around a word that is not part of it ("(CVE-1)," -> "CVE-1").
_AROUND = "\"'()[]{}<>,;:?!."


@dataclass(frozen=True)
class Chunk:
    """What fusion reads of a candidate: its `text` and how many chunks its file has."""

    text: str
    file_chunks: int = 1


@dataclass(frozen=True)
class Vote:
    """A list's say on a hit: the `rank` (from 1) and raw `score` of the hit's best member in
    that list (rank 0 and score 0 when only a neighbouring chunk was ranked), and the vote
    it gave (`normalised`, neighbours' share included), before the list's weight."""

    rank: int
    score: float
    vote: float


@dataclass(frozen=True)
class Fused:
    """A fused hit: the chunk `key` shown, its fused `score`, each list's `votes` (lists
    that ranked none of its chunks are absent), the near duplicates folded into it
    (`similar`), the adjacent chunks of its file folded into it (`adjacent`), and the share
    of its score lost as boilerplate."""

    key: Key
    score: float
    votes: Mapping[str, Vote]
    similar: tuple[Key, ...] = ()
    adjacent: tuple[Key, ...] = ()
    boilerplate: float = 0.0


# Where `fuse` notes a hit past its limit.
_BELOW_LIMIT = -1


@dataclass
class _Unit:
    members: list[Key]
    key: Key
    votes: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # rank, raw, norm
    boilerplate: float = 0.0


def identifier_share(query: str) -> float:
    """The share of the query's words that look like identifiers (see _IDENTIFIER)."""
    words = [w.strip(_AROUND) for w in query.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0
    return sum(1 for w in words if _IDENTIFIER.search(w)) / len(words)


def weights_for(query: str) -> dict[str, float]:
    """The lists' weights for `query`: BM25 1; vectors PROSE_VECTOR_WEIGHT for a question in
    words, IDENTIFIER_VECTOR_WEIGHT for one made of identifiers, in between by the share of
    its words that are identifiers. Vectors of a bare identifier rank by the look of its
    letters, whereas BM25 finds the chunks that hold it; in a sentence it is the other way."""
    share = identifier_share(query)
    vector = PROSE_VECTOR_WEIGHT * (1.0 - share) + IDENTIFIER_VECTOR_WEIGHT * share
    return {VECTOR: vector, BM25: 1.0}


def normalised(scores: Sequence[float], unlisted: int = 0) -> list[float]:
    """Each score as how far it stands above the list's mean, in standard deviations
    (never below 0): a list with a clear winner gives it a large vote, a flat list (vectors
    for a bare identifier, BM25 for words every chunk has) gives nobody much. `unlisted`
    more chunks scored 0 and are counted in the mean and spread: a BM25 list that names
    only the two chunks holding a rare identifier then gives both a large vote, where the
    two alone, equal, would give nothing. A list of one gives it 1 (unless `unlisted`); a
    list of equal scores gives each 0."""
    n = len(scores) + unlisted
    if not scores or n < 2:
        return [1.0] * len(scores)
    mean = sum(scores) / n
    spread = math.sqrt((sum((s - mean) ** 2 for s in scores) + unlisted * mean**2) / n)
    if spread == 0:
        return [0.0] * len(scores)
    return [max(0.0, (s - mean) / spread) for s in scores]


# A chunk's shingles: the hashes of its runs of words. Word hashes are Python's own (salted
# per process), so only comparisons within one query are made with them; what fusion returns
# does not depend on their values. Arrays rather than sets of tuples: the text work of a
# query (about a hundred chunks of a few hundred words) is then a few numpy sorts over all
# of them at once instead of tens of thousands of Python set operations.
Shingles = np.ndarray[Any, np.dtype[np.uint64]]
_NO_SHINGLES: Shingles = np.zeros(0, dtype=np.uint64)
# An odd 64-bit multiplier (2**64 / golden ratio) folding a run of word hashes into one:
# the words' order changes the result, and products wrap modulo 2**64.
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _runs(texts: Sequence[str]) -> tuple[Shingles, np.ndarray[Any, np.dtype[np.int64]]]:
    """The hashes of each chunk's runs of SHINGLE_WORDS words (lower-cased, split at white
    space: punctuation stays on its word, which only has to be the same in two copies; five
    times faster than a word pattern) at its first MAX_SHINGLES positions, repeats
    included, for all the chunks at once; and the chunk (its place in `texts`) of each."""
    longest = MAX_SHINGLES + SHINGLE_WORDS - 1
    words: list[str] = []
    counts: list[int] = []
    for text in texts:
        mine = text.lower().split(maxsplit=longest)[:longest]
        words.extend(mine)
        counts.append(len(mine))
    runs = len(words) - SHINGLE_WORDS + 1
    if runs <= 0:
        return _NO_SHINGLES, np.zeros(0, dtype=np.int64)
    hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    mixed = hashes[:runs].copy()
    with np.errstate(over="ignore"):
        for i in range(1, SHINGLE_WORDS):
            mixed = mixed * _MIX + hashes[i : i + runs]
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
    within = owner[:runs] == owner[SHINGLE_WORDS - 1 :]  # not across two chunks
    return mixed[within], owner[:runs][within]


def shingles(text: str) -> Shingles:
    """The chunk's distinct shingles (see `_runs`), sorted."""
    return _distinct(_runs([text])[0])


def _distinct(values: np.ndarray[Any, np.dtype[Any]]) -> np.ndarray[Any, np.dtype[Any]]:
    """The distinct values, sorted (a sort and a mask: numpy's `unique` takes three times as
    long on a query's shingles)."""
    ordered = np.sort(values)
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


@dataclass(frozen=True)
class _Held:
    """The shingles of a group of chunks, as every distinct (chunk, shingle) pair, sorted by
    chunk then shingle: `chunk[i]` (the chunk's place in the group) holds `shingle[i]` (the
    shingle's place among the group's distinct shingles, `distinct` of them), which
    `held[i]` chunks of the group hold; chunk c has `sizes[c]` shingles, its pairs from
    `starts[c]` on."""

    chunk: np.ndarray[Any, np.dtype[np.int64]]
    shingle: np.ndarray[Any, np.dtype[np.int64]]
    held: np.ndarray[Any, np.dtype[np.int64]]
    sizes: np.ndarray[Any, np.dtype[np.int64]]
    starts: np.ndarray[Any, np.dtype[np.int64]]
    distinct: int

    def of(self, c: int) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Chunk c's shingles, sorted."""
        first = int(self.starts[c])
        return self.shingle[first : first + int(self.sizes[c])]


def _held(texts: Sequence[str]) -> _Held:
    """The `_Held` of chunks with these texts (two sorts over all of them)."""
    runs, owner = _runs(texts)
    if not len(runs):
        none = np.zeros(0, dtype=np.int64)
        zeros = np.zeros(len(texts), dtype=np.int64)
        return _Held(none, none, none, zeros, zeros, 0)
    distinct, inverse = np.unique(runs, return_inverse=True)
    width = len(distinct)
    pairs = _distinct(owner * width + inverse.astype(np.int64))
    chunk, shingle = np.divmod(pairs, width)
    sizes = np.bincount(chunk, minlength=len(texts)).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    held = np.bincount(shingle, minlength=width)[shingle].astype(np.int64)
    return _Held(chunk, shingle, held, sizes, starts, width)


def near_duplicates(texts: Mapping[Key, str]) -> list[list[Key]]:
    """Groups of chunks that share NEAR_DUPLICATE or more of the larger one's shingles (each
    chunk in exactly one group, in the order given)."""
    return _near_duplicates(list(texts), _held(list(texts.values())))


def _near_duplicates(keys: Sequence[Key], held: _Held) -> list[list[Key]]:
    """near_duplicates over the shingles `held` by `keys`. Only chunks that share one of the
    rarest shingles of each are compared (prefix filtering: two sets sharing a share t of
    the larger one share one of the first (1 - t) * size + 1 shingles of each, ranked rarest
    first), so a phrase every candidate holds does not make every pair a comparison; a pair
    already in one group is not compared again (a hundred copies of a paragraph are a
    hundred unions, not five thousand comparisons)."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if held.distinct:
        # Each chunk's shingles rarest first (ties by the shingle itself, one order for all).
        width = held.distinct
        order = np.argsort((held.chunk * (len(keys) + 1) + held.held) * width + held.shingle)
        chunk, shingle = held.chunk[order], held.shingle[order]
        place = np.arange(len(chunk)) - held.starts[chunk]
        prefix = ((1.0 - NEAR_DUPLICATE) * held.sizes).astype(np.int64) + 1
        keep = (place < prefix[chunk]) & (held.sizes[chunk] >= MIN_SHINGLES)
        chunk, shingle = chunk[keep], shingle[keep]
        # Pairs of chunks whose prefixes share a shingle, each once: only the prefix
        # shingles that two or more chunks hold are looked at.
        shared = np.bincount(shingle, minlength=width)[shingle] > 1
        chunk, shingle = chunk[shared], shingle[shared]
        by_shingle = np.argsort(shingle, kind="stable")
        groups: dict[int, list[int]] = {}
        for s, c in zip(shingle[by_shingle].tolist(), chunk[by_shingle].tolist(), strict=True):
            groups.setdefault(s, []).append(c)
        pairs: set[tuple[int, int]] = set()
        for members in groups.values():
            pairs.update((a, b) for i, a in enumerate(members) for b in members[i + 1 :])
        for a, b in sorted(pairs):
            if root(a) == root(b):
                continue
            large = max(int(held.sizes[a]), int(held.sizes[b]))
            common = np.intersect1d(held.of(a), held.of(b), assume_unique=True).size
            if common >= NEAR_DUPLICATE * large:
                parent[root(b)] = root(a)
    found: dict[int, list[Key]] = {}
    for i, key in enumerate(keys):
        found.setdefault(root(i), []).append(key)
    return list(found.values())


def boilerplate_shares(
    texts: Mapping[Key, str], file_chunks: Mapping[Key, int] | None = None
) -> dict[Key, float]:
    """Each chunk's share of shingles that recur in BOILERPLATE_FILES or more files and
    that it quotes. A recurring shingle belongs to one chunk, which does not quote it: the
    one of the smallest file (`file_chunks`: the licence itself rather than the copyright
    files quoting it), among those the one made most wholly of recurring text. Shares under
    BOILERPLATE_MIN count as 0."""
    keys = list(texts)
    held = _held(list(texts.values()))
    return _boilerplate_shares(keys, held, file_chunks or {})


def _boilerplate_shares(
    keys: Sequence[Key], held: _Held, sizes: Mapping[Key, int]
) -> dict[Key, float]:
    out = dict.fromkeys(keys, 0.0)
    if not held.distinct:
        return out
    file_ids: dict[str, int] = {}
    file_of = np.asarray([file_ids.setdefault(f, len(file_ids)) for f, _ in keys], dtype=np.int64)
    # Files holding each shingle: distinct (shingle, file) pairs counted per shingle.
    pair = _distinct(held.shingle * len(file_ids) + file_of[held.chunk])
    files = np.bincount(pair // len(file_ids), minlength=held.distinct)
    recurring = files[held.shingle] >= BOILERPLATE_FILES
    if not recurring.any():
        return out
    whole = np.bincount(held.chunk[recurring], minlength=len(keys)) / np.maximum(held.sizes, 1)
    # Each recurring shingle's owner: the first of its chunks in this order (an empty chunk
    # owns nothing, so only chunks with shingles are ordered).
    texts = np.flatnonzero(held.sizes).tolist()
    ranked = sorted(texts, key=lambda i: (sizes.get(keys[i], 1), -whole[i], keys[i]))
    rank = np.zeros(len(keys), dtype=np.int64)
    rank[ranked] = np.arange(len(ranked))
    owner = np.full(held.distinct, len(keys), dtype=np.int64)
    np.minimum.at(owner, held.shingle[recurring], rank[held.chunk[recurring]])
    quoting = recurring & (owner[held.shingle] != rank[held.chunk])
    quoted = np.bincount(held.chunk[quoting], minlength=len(keys)) / np.maximum(held.sizes, 1)
    for i in np.flatnonzero(quoted >= BOILERPLATE_MIN).tolist():
        out[keys[i]] = float(quoted[i])
    return out


def _votes(
    lists: Mapping[str, Sequence[tuple[Key, float]]], weights: Mapping[str, float]
) -> tuple[dict[str, dict[Key, tuple[int, float, float]]], list[Key], dict[Key, float]]:
    """Each list's (rank, raw score, normalised vote) per key, the candidates in the order
    the lists name them (at most MAX_CANDIDATES), and each candidate's own weighted vote."""
    norms: dict[str, dict[Key, tuple[int, float, float]]] = {}
    order: list[Key] = []
    # The longest list says how many chunks each list could have named: a shorter list of
    # ZERO_FLOORED scores names every chunk that scored above 0, and the rest scored 0.
    depth = max((len(ranking[:MAX_CANDIDATES]) for ranking in lists.values()), default=0)
    for name, ranking in lists.items():
        ranking = ranking[:MAX_CANDIDATES]
        unlisted = depth - len(ranking) if name in ZERO_FLOORED else 0
        normed = normalised([s for _, s in ranking], unlisted)
        mine: dict[Key, tuple[int, float, float]] = {}
        for rank, ((key, score), vote) in enumerate(zip(ranking, normed, strict=True), start=1):
            mine.setdefault(key, (rank, score, vote))
            order.append(key)
        norms[name] = mine
    candidates = list(dict.fromkeys(order))[:MAX_CANDIDATES]
    own = {
        key: sum(weights.get(n, 1.0) * norms[n][key][2] for n in norms if key in norms[n])
        for key in candidates
    }
    return norms, candidates, own


class Fusion:
    """The ranked `lists` (name -> (key, score) best first) put on one scale once, for a
    caller that must read texts between the two steps: `compared` names the candidates whose
    texts fusion reads (the COMPARED best by their own votes; the caller fetches only these,
    and every candidate's file size), and `fuse` ranks the passages from them."""

    def __init__(
        self,
        lists: Mapping[str, Sequence[tuple[Key, float]]],
        *,
        weights: Mapping[str, float] = WEIGHTS,
    ) -> None:
        self._weights = weights
        self._norms, self._candidates, self._own = _votes(lists, weights)
        self.compared: list[Key] = sorted(self._candidates, key=lambda k: -self._own[k])[:COMPARED]

    def fuse(self, chunks: Mapping[Key, Chunk], *, limit: int | None = None) -> list[Fused]:
        """The passages the lists point to, best first, by the rules of this module: the
        first `limit` of them (all when None; the ones below still fold into those as their
        neighbours). `chunks` holds every listed key's file size and the texts of those
        `compared` names (others are not read); a key missing from it counts as an empty
        chunk of a one-chunk file."""
        return _fused(
            self._norms, self._candidates, self._own, set(self.compared), chunks,
            self._weights, limit,
        )  # fmt: skip


def compared(
    lists: Mapping[str, Sequence[tuple[Key, float]]], *, weights: Mapping[str, float] = WEIGHTS
) -> list[Key]:
    """`Fusion.compared` of these lists."""
    return Fusion(lists, weights=weights).compared


def fuse(
    lists: Mapping[str, Sequence[tuple[Key, float]]],
    chunks: Mapping[Key, Chunk],
    *,
    weights: Mapping[str, float] = WEIGHTS,
    limit: int | None = None,
) -> list[Fused]:
    """`Fusion.fuse` of these lists."""
    return Fusion(lists, weights=weights).fuse(chunks, limit=limit)


def _fused(
    norms: Mapping[str, Mapping[Key, tuple[int, float, float]]],
    candidates: Sequence[Key],
    own: Mapping[Key, float],
    read: set[Key],
    chunks: Mapping[Key, Chunk],
    weights: Mapping[str, float],
    limit: int | None,
) -> list[Fused]:
    # Only the best candidates are compared as text (see COMPARED); the others stay alone.
    held = _held([chunks[key].text if key in chunks and key in read else "" for key in candidates])
    sizes = {key: chunks[key].file_chunks if key in chunks else 1 for key in candidates}
    shares = _boilerplate_shares(candidates, held, sizes)

    units: list[_Unit] = []
    unit_of: dict[Key, _Unit] = {}
    for members in _near_duplicates(candidates, held):
        best = min(members, key=lambda k: (-own[k], sizes[k], k))
        unit = _Unit(members, best, boilerplate=shares[best])
        for name, mine in norms.items():
            given = [mine[m] for m in members if m in mine]
            if given:
                unit.votes[name] = max(given, key=lambda v: (v[2], -v[0]))
        units.append(unit)
        for m in members:
            unit_of[m] = unit

    def neighbours(unit: _Unit) -> set[int]:
        near = set()
        for file, i in unit.members:
            for j in (i - 1, i + 1):
                other = unit_of.get((file, j))
                if other is not None and other is not unit:
                    near.add(id(other))
        return near

    by_id = {id(u): u for u in units}
    scored: list[tuple[float, _Unit, dict[str, tuple[int, float, float]]]] = []
    for unit in units:
        near = [by_id[i] for i in neighbours(unit)]
        votes: dict[str, tuple[int, float, float]] = {}
        total = 0.0
        for name in norms:
            rank, raw, vote = unit.votes.get(name, (0, 0.0, 0.0))
            if near:
                lent = max((n.votes[name][2] for n in near if name in n.votes), default=0.0)
                vote = max(vote, NEIGHBOUR_SHARE * lent)
            if name in unit.votes or vote > 0:
                votes[name] = (rank, raw, vote)
            total += weights.get(name, 1.0) * vote
        total *= 1.0 - BOILERPLATE_WEIGHT * unit.boilerplate
        scored.append((total, unit, votes))
    scored.sort(key=lambda t: (-t[0], sizes[t[1].key], t[1].key))

    out: list[Fused] = []
    # A shown member -> its hit's place in `out` (BELOW_LIMIT for a hit past `limit`).
    shown: dict[Key, int] = {}
    for total, unit, votes in scored:
        file, i = unit.key
        host = next((shown[(file, j)] for j in (i - 1, i + 1) if (file, j) in shown), None)
        if host == _BELOW_LIMIT or (host is None and limit is not None and len(out) >= limit):
            shown[unit.key] = _BELOW_LIMIT  # not returned, but its neighbours fold into it
            continue
        if host is not None:
            hit = out[host]
            out[host] = Fused(
                hit.key, hit.score, hit.votes, hit.similar, (*hit.adjacent, unit.key),
                hit.boilerplate,
            )  # fmt: skip
            shown[unit.key] = host
            continue
        similar = tuple(m for m in unit.members if m != unit.key)
        said = {name: Vote(*v) for name, v in votes.items()}
        out.append(Fused(unit.key, total, said, similar, (), unit.boilerplate))
        shown[unit.key] = len(out) - 1
    return out
