"""Ranked lists of chunks in, ranked passages out (pure: no I/O, no model).

Each list (cosine to the query, BM25 over the words) ranks chunks by its own scale. Fusion:

1. Each list's scores are put on one scale: how many standard deviations a chunk's score
   stands above the list's mean (`normalised`), so a clear first place in one list carries
   a large vote on its own, and a list whose scores are flat (vectors for a bare identifier)
   gives little to anyone. A chunk absent from a list gets 0 from it. The lists are
   weighted by the query's shape (`weights_for`): vectors count more for a question in
   words, BM25 for identifiers, flags and error codes.
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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Key = tuple[str, int]  # (file, chunk index)

# Names of the lists fusion knows; other names are accepted with weight 1.
VECTOR = "vector"
BM25 = "bm25"
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

_WORD = re.compile(r"\w+")
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


def normalised(scores: Sequence[float]) -> list[float]:
    """Each score as how far it stands above the list's mean, in standard deviations
    (never below 0): a list with a clear winner gives it a large vote, a flat list (vectors
    for a bare identifier, BM25 for words every chunk has) gives nobody much. A list of one
    gives it 1; a list of equal scores gives each 0."""
    if len(scores) < 2:
        return [1.0] * len(scores)
    mean = sum(scores) / len(scores)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if spread == 0:
        return [0.0] * len(scores)
    return [max(0.0, (s - mean) / spread) for s in scores]


# A shingle as the hash of its words: ints compare and sort far faster than tuples of
# strings. Python salts string hashes per process, so only comparisons within one query are
# made with them; what fusion returns does not depend on their values.
Shingle = int


def shingles(text: str) -> frozenset[Shingle]:
    """The chunk's runs of SHINGLE_WORDS words (lower-cased), from its first MAX_SHINGLES
    positions, hashed."""
    words = [w.lower() for w in _WORD.findall(text)][: MAX_SHINGLES + SHINGLE_WORDS - 1]
    return frozenset(map(hash, zip(*(words[i:] for i in range(SHINGLE_WORDS)), strict=False)))


def near_duplicates(texts: Mapping[Key, str]) -> list[list[Key]]:
    """Groups of chunks that share NEAR_DUPLICATE or more of the larger one's shingles (each
    chunk in exactly one group, in the order given)."""
    return _near_duplicates({key: shingles(text) for key, text in texts.items()})


def _near_duplicates(sets: Mapping[Key, frozenset[Shingle]]) -> list[list[Key]]:
    """near_duplicates over shingle sets. Only chunks that share one of the rarest shingles
    of each are compared (prefix filtering: two sets sharing a share t of the larger one
    share one of the first (1 - t) * size + 1 shingles of each, ranked rarest first), so a
    phrase every candidate holds does not make every pair a comparison."""
    parent = {key: key for key in sets}

    def root(k: Key) -> Key:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    held: dict[Shingle, int] = defaultdict(int)
    for s in sets.values():
        for h in s:
            held[h] += 1
    prefix_of: dict[Key, list[Shingle]] = {}
    for key, s in sets.items():
        if len(s) >= MIN_SHINGLES:
            ranked = sorted(s, key=lambda h: (held[h], h))
            prefix_of[key] = ranked[: int((1.0 - NEAR_DUPLICATE) * len(s)) + 1]
    postings: dict[Shingle, list[Key]] = defaultdict(list)
    for key, prefix in prefix_of.items():
        for h in prefix:
            postings[h].append(key)
    for key, prefix in prefix_of.items():
        others = {other for h in prefix for other in postings[h] if other != key}
        for other in others:
            large = max(len(sets[key]), len(sets[other]))
            if len(sets[key] & sets[other]) >= NEAR_DUPLICATE * large:
                parent[root(other)] = root(key)
    groups: dict[Key, list[Key]] = {}
    for key in sets:
        groups.setdefault(root(key), []).append(key)
    return list(groups.values())


def boilerplate_shares(
    texts: Mapping[Key, str], file_chunks: Mapping[Key, int] | None = None
) -> dict[Key, float]:
    """Each chunk's share of shingles that recur in BOILERPLATE_FILES or more files and
    that it quotes. A recurring shingle belongs to one chunk, which does not quote it: the
    one of the smallest file (`file_chunks`: the licence itself rather than the copyright
    files quoting it), among those the one made most wholly of recurring text. Shares under
    BOILERPLATE_MIN count as 0."""
    return _boilerplate_shares({key: shingles(t) for key, t in texts.items()}, file_chunks or {})


def _boilerplate_shares(
    sets: Mapping[Key, frozenset[Shingle]], sizes: Mapping[Key, int]
) -> dict[Key, float]:
    files: dict[Shingle, set[str]] = defaultdict(set)
    for (file, _), s in sets.items():
        for h in s:
            files[h].add(file)
    recurring = {
        key: [h for h in s if len(files[h]) >= BOILERPLATE_FILES] for key, s in sets.items()
    }
    whole = {key: len(r) / len(sets[key]) if sets[key] else 0.0 for key, r in recurring.items()}
    owner: dict[Shingle, Key] = {}
    for key in sorted(sets, key=lambda k: (sizes.get(k, 1), -whole[k], k)):
        for h in recurring[key]:
            owner.setdefault(h, key)
    out = {}
    for key, r in recurring.items():
        quoted = sum(1 for h in r if owner[h] != key) / len(sets[key]) if sets[key] else 0.0
        out[key] = quoted if quoted >= BOILERPLATE_MIN else 0.0
    return out


def fuse(
    lists: Mapping[str, Sequence[tuple[Key, float]]],
    chunks: Mapping[Key, Chunk],
    *,
    weights: Mapping[str, float] = WEIGHTS,
) -> list[Fused]:
    """The passages the ranked `lists` (name -> (key, score) best first) point to, best
    first, by the rules of this module. `chunks` holds every listed key's text and file
    size; a key missing from it counts as an empty chunk of a one-chunk file."""
    norms: dict[str, dict[Key, tuple[int, float, float]]] = {}
    order: list[Key] = []
    for name, ranking in lists.items():
        ranking = ranking[:MAX_CANDIDATES]
        normed = normalised([s for _, s in ranking])
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
    # Only the best candidates are compared as text (see COMPARED); the others stay alone.
    best_first = sorted(candidates, key=lambda k: -own[k])
    compared = set(best_first[:COMPARED])
    sets = {
        key: shingles(chunks[key].text) if key in chunks and key in compared else frozenset()
        for key in candidates
    }
    sizes = {key: chunks[key].file_chunks if key in chunks else 1 for key in candidates}
    shares = _boilerplate_shares(sets, sizes)

    units: list[_Unit] = []
    unit_of: dict[Key, _Unit] = {}
    for members in _near_duplicates(sets):
        best = min(members, key=lambda k: (-own[k], sizes[k], k))
        unit = _Unit(members, best, boilerplate=shares[best])
        for name, mine in norms.items():
            held = [mine[m] for m in members if m in mine]
            if held:
                unit.votes[name] = max(held, key=lambda v: (v[2], -v[0]))
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
    scored: list[tuple[float, _Unit, dict[str, Vote]]] = []
    for unit in units:
        near = [by_id[i] for i in neighbours(unit)]
        votes: dict[str, Vote] = {}
        total = 0.0
        for name in norms:
            rank, raw, vote = unit.votes.get(name, (0, 0.0, 0.0))
            lent = max((n.votes[name][2] for n in near if name in n.votes), default=0.0)
            vote = max(vote, NEIGHBOUR_SHARE * lent)
            if name in unit.votes or vote > 0:
                votes[name] = Vote(rank, raw, vote)
            total += weights.get(name, 1.0) * vote
        total *= 1.0 - BOILERPLATE_WEIGHT * unit.boilerplate
        scored.append((total, unit, votes))
    scored.sort(key=lambda t: (-t[0], sizes[t[1].key], t[1].key))

    out: list[Fused] = []
    shown: dict[Key, int] = {}  # a shown member -> its hit's place in `out`
    for total, unit, votes in scored:
        file, i = unit.key
        host = next((shown[(file, j)] for j in (i - 1, i + 1) if (file, j) in shown), None)
        if host is not None:
            hit = out[host]
            out[host] = Fused(
                hit.key, hit.score, hit.votes, hit.similar, (*hit.adjacent, unit.key),
                hit.boilerplate,
            )  # fmt: skip
            shown[unit.key] = host
            continue
        similar = tuple(m for m in unit.members if m != unit.key)
        out.append(Fused(unit.key, total, votes, similar, (), unit.boilerplate))
        shown[unit.key] = len(out) - 1
    return out
