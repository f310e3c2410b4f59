"""Search over an index: chunks ranked by cosine to the embedded query, by BM25 over the
words, or both, the lists fused into passages (`embedd.index.fusion`: near duplicates
folded, adjacent chunks voting together, boilerplate down-weighted); each hit shown at its
best passage (by the query's words, else by meaning) with the query's words in it found, and
its path relative to the indexed folder. A reranker (a cross-encoder the daemon serves) may
reorder the best fused candidates: it reads query and chunk together, which neither list can.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embedd_client
import numpy as np

from embedd.index import fusion
from embedd.index.records import model_fingerprint
from embedd.index.store import (
    FTS_TABLE,
    VECTOR_ITEM_BYTES,
    IndexUsageError,
    columns_of,
    display,
    mismatch,
    model_card,
    open_read_only,
    relative_paths,
)

# Ranking modes of `search`.
MODE_HYBRID = "hybrid"
MODE_VECTOR = "vector"
MODE_BM25 = "bm25"
MODES = (MODE_HYBRID, MODE_VECTOR, MODE_BM25)
# Hybrid measured better than either alone on tests/data/relevance (docs/search.md, "How
# well each mode finds the answer"), so it is the default.
DEFAULT_MODE = MODE_HYBRID
# Chunks each list brings to fusion (at least; more when more hits are asked for): enough
# that every copy of a duplicated passage and the neighbours of the best chunks are among
# them; past a few hundred ranks a chunk stands below the list's mean and votes nothing.
CANDIDATES = 200
# Fused hits a reranker reorders (at least; all asked for when more): a cross-encoder reads
# each whole chunk beside the query, about 20 times the work of embedding the query alone per
# chunk, so its depth is what a search can afford at interactive speed; an answer further
# down than this in the fused list is rare (docs/search.md, the relevance figures).
RERANK_DEPTH = 20

# Characters of a passage at most: about two lines of a terminal, one or two sentences.
PASSAGE_CHARS = 240
# Words that say nothing about what is sought: left out when a passage is chosen by the words
# it shares with the query (BM25 itself weighs them down by their frequency in the index).
_STOPWORD_TEXT = """
a an and are as at be by can do does for from how i in is it my of on or should that the this
to what when where which who why will with you your
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Sentence ends: a long line (an unwrapped Markdown paragraph) is cut into passages here.
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_WORD = re.compile(r"\w+")
# What joins the words of one identifier (CVE-2024-1, ssl.conf, a/b): matched words joined
# by it are marked as one.
_JOINER = re.compile(r"[-.@/:]")


@dataclass(frozen=True)
class Explanation:
    """Why a hit ranks where it does: each list's say (`votes`: rank, raw score and vote of
    the hit's best chunk there; a list that ranked none of its chunks is absent), the weight
    of each list for this query, the share of its score lost as boilerplate, the paths of
    the near duplicates folded into it and the adjacent chunks of its file folded into it
    (as chunk indexes)."""

    votes: dict[str, fusion.Vote]
    weights: dict[str, float]
    boilerplate: float
    similar: tuple[str, ...]
    adjacent: tuple[int, ...]
    # With a reranker: the hit's rank in the fused list before it reordered them (1 = first)
    # and the fused score it had there; the hit's own `score` is then the reranker's.
    fused_rank: int | None = None
    fused_score: float | None = None


@dataclass(frozen=True)
class Hit:
    """One result: the chunk `span` (characters) of `file`, shown as `path` (relative to the
    indexed folder) at `line` (of its best passage; 0 when the index predates line numbers),
    with that `passage`, the character spans of the query's words in it (`matches`), the
    chunk's whole `text` and its `score` in the mode's own scale (cosine for vector, BM25
    with larger better for bm25, the fused vote for hybrid). `similar` counts the near
    duplicates folded into it (their paths are in `why.similar`); `why` says how it was
    ranked."""

    file: str
    path: str
    line: int
    score: float
    passage: str
    text: str
    span: tuple[int, int]
    matches: tuple[tuple[int, int], ...] = ()
    similar: int = 0
    why: Explanation | None = None


def search(
    index: str | os.PathLike[str],
    query: str,
    *,
    k: int = 10,
    mode: str = DEFAULT_MODE,
    paths: Sequence[str] = (),
    client: embedd_client.Client | None = None,
    socket: str | os.PathLike[str] | None = None,
    note: Callable[[str], None] | None = None,
    rerank: str | None = None,
) -> list[Hit]:
    """The `k` chunks of `index` that best answer `query`, best first: by `mode` ("hybrid":
    vector and BM25 rankings fused; "vector"; "bm25", which needs no daemon), among files whose
    path relative to the indexed folder matches one of the globs `paths` (all when empty; a
    glob starting with `/`, `./` or `../` is a path from the current directory).
    `note` receives a one-line remark when an old index limits what can be done (no keyword
    table yet: hybrid falls back to vectors). `rerank` names a reranker the daemon serves: the
    first `max(k, RERANK_DEPTH)` fused hits are scored by it against the query and reordered,
    and each hit's score is the reranker's. Raises IndexUsageError, naming the file, for
    anything wrong with `index` (missing, a directory, not SQLite, truncated, another
    program's database, vectors of another length than the model's, another model)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if client is None and (mode != MODE_BM25 or rerank is not None):
        with embedd_client.Client(socket) as own:
            return search(
                index, query, k=k, mode=mode, paths=paths, client=own, note=note, rerank=rerank
            )
    path = Path(index)
    shown = display(str(path))
    if not path.exists():
        raise IndexUsageError(f"no index at {shown} (build one with `embedd index`)")
    if path.is_dir():
        raise IndexUsageError(f"{shown} is a directory, not an index file")
    try:
        return _search(client, path, shown, query, k, mode, paths, note, rerank)
    except sqlite3.Error as exc:
        raise IndexUsageError(
            f"{shown}: {exc} (not an index `embedd index` wrote, or damaged)"
        ) from None


Key = tuple[str, int]


def _search(
    client: embedd_client.Client | None,
    index: Path,
    shown: str,
    query: str,
    k: int,
    mode: str,
    globs: Sequence[str],
    note: Callable[[str], None] | None,
    rerank: str | None = None,
) -> list[Hit]:
    db, tables = open_read_only(index, shown)
    try:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        has_lines = "line" in columns_of(db, "chunks")
        if FTS_TABLE not in tables or not has_lines:
            old = f"{shown} was built before keyword search and line numbers"
            if mode == MODE_BM25 and FTS_TABLE not in tables:
                raise IndexUsageError(f"{old}: re-run `embedd index` on it to add them")
            if note is not None:
                note(f"{old}: ranked by vectors only; re-run `embedd index` to add them")
            mode = MODE_VECTOR
        file_chunks = dict(db.execute("SELECT path, chunks FROM files").fetchall())
        files = list(file_chunks)
        rel = relative_paths(files, json.loads(meta.get("roots", "[]")))
        allowed = {f for f in files if _path_matches(rel[f], globs, f)} if globs else None
        q: np.ndarray[Any, np.dtype[np.float32]] | None = None
        lists: dict[str, list[tuple[Key, float]]] = {}
        wanted = max(k, CANDIDATES)
        if mode != MODE_BM25:
            assert client is not None
            q = _query_vector(client, meta, query)
            lists[fusion.VECTOR] = _vector_ranking(db, shown, q, allowed, wanted)
        if mode != MODE_VECTOR:
            lists[fusion.BM25] = _bm25_ranking(db, query, allowed, wanted)
        weights = fusion.weights_for(query) if len(lists) > 1 else {n: 1.0 for n in lists}
        chunks = _candidates(db, lists, file_chunks)
        depth = k if rerank is None else max(k, RERANK_DEPTH)
        fused = fusion.fuse(lists, chunks, weights=weights)[:depth]
        details = [
            db.execute(
                f"SELECT start, end, text, {'line' if has_lines else '0'} FROM chunks "
                "WHERE file = ? AND idx = ?",
                f.key,
            ).fetchone()
            for f in fused
        ]
    finally:
        db.close()
    fused_ranks: list[int | None] = [None] * len(fused)
    fused_scores: list[float | None] = [None] * len(fused)
    reranked: list[float] = []
    if rerank is not None:
        assert client is not None
        order = _reranked(client, rerank, query, [d[2] for d in details])[:k]
        fused_ranks = [i + 1 for i, _ in order]
        fused_scores = [fused[i].score for i, _ in order]
        reranked = [score for _, score in order]
        fused = [fused[i] for i, _ in order]
        details = [details[i] for i, _ in order]
    model = meta.get("model", "default")
    passages = _best_passages(client, model, q, query, [d[2] for d in details])
    hits = []
    for n, (f, (start, end, text, line), (offset, passage)) in enumerate(
        zip(fused, details, passages, strict=True)
    ):
        file = f.key[0]
        passage_line = line + text.count("\n", 0, offset) if line else 0
        # One list: its own score (cosine, BM25); several: the fused vote; reranked: the
        # reranker's score.
        score = next(iter(f.votes.values())).score if len(lists) == 1 else f.score
        if reranked:
            score = reranked[n]
        why = Explanation(
            dict(f.votes),
            weights,
            f.boilerplate,
            tuple(rel.get(s, s) for s, _ in f.similar),
            tuple(i for _, i in f.adjacent),
            fused_ranks[n],
            fused_scores[n],
        )
        hits.append(
            Hit(file, rel[file], passage_line, score, passage, text, (start, end),
                matches(query, passage), len(f.similar), why)
        )  # fmt: skip
    return hits


def _reranked(
    client: embedd_client.Client, model: str, query: str, texts: Sequence[str]
) -> list[tuple[int, float]]:
    """(index in `texts`, score) of each text by the reranker `model`, best first. A model
    that does not rerank (or is not served) is the user's to fix: IndexUsageError."""
    if not texts:
        return []
    try:
        ranked = client.rerank(query, texts, model)
    except embedd_client.EmbeddError as exc:
        if exc.code in ("bad_request", "unknown_model", "model_load_failed"):
            raise IndexUsageError(f"--rerank {model}: {exc.message}") from None
        raise
    return [(r.index, r.score) for r in ranked]


def _candidates(
    db: sqlite3.Connection,
    lists: dict[str, list[tuple[Key, float]]],
    file_chunks: dict[str, int],
) -> dict[Key, fusion.Chunk]:
    """The text and file size of every chunk the lists rank (a point lookup each)."""
    keys = dict.fromkeys(key for ranking in lists.values() for key, _ in ranking)
    out = {}
    for key in keys:
        row = db.execute("SELECT text FROM chunks WHERE file = ? AND idx = ?", key).fetchone()
        if row is not None:
            out[key] = fusion.Chunk(row[0], int(file_chunks.get(key[0], 1)))
    return out


def _query_vector(
    client: embedd_client.Client, meta: dict[str, str], query: str
) -> np.ndarray[Any, np.dtype[np.float32]]:
    model = meta.get("model", "default")
    card = model_card(client, model)
    error = mismatch(str(meta.get("fingerprint", "")), model_fingerprint(card), model, model)
    if error is not None:
        raise error
    # A query longer than the model's limit (a pasted paragraph) is split into windows and
    # pooled, as the daemon does for any input: the whole paragraph is what is sought.
    options: embedd_client.EmbedOptions = {"priority": "interactive", "long": "split"}
    if "query" in (card.get("prompts") or []):
        options["prompt"] = "query"
    q = np.asarray(client.embed(query, model, **options), dtype=np.float32)
    return q / np.linalg.norm(q)


def _vector_ranking(
    db: sqlite3.Connection,
    shown: str,
    q: np.ndarray[Any, np.dtype[np.float32]],
    allowed: set[str] | None,
    k: int,
) -> list[tuple[Key, float]]:
    """Chunks by cosine to `q`, best first: the top `k` (CANDIDATES when 0)."""
    rows = db.execute("SELECT file, idx, vector FROM chunks").fetchall()
    if allowed is not None:
        rows = [r for r in rows if r[0] in allowed]
    if not rows:
        return []
    width = len(q) * VECTOR_ITEM_BYTES
    wrong = [r for r in rows if not isinstance(r[2], bytes) or len(r[2]) != width]
    if wrong:
        first = wrong[0][2]
        size = f"{len(first)} bytes" if isinstance(first, bytes) else type(first).__name__
        raise IndexUsageError(
            f"{shown}: {len(wrong)} of {len(rows)} stored vectors are not {len(q)} float32 "
            f"(the model's dimension); the first is {size}: the index is damaged, rebuild it"
        )
    matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype="<f4").reshape(len(rows), -1)
    scores = matrix @ q  # stored vectors are normalized
    order = np.argsort(-scores, kind="stable")[: k or CANDIDATES]
    return [((rows[i][0], int(rows[i][1])), float(scores[i])) for i in order]


def _fts_query(query: str) -> str:
    """The query's words as an FTS5 query that cannot be a syntax error: each word quoted
    (FTS5 strings double their quotes), any of them may match (OR), BM25 weighing each by
    how rare it is."""
    words = _WORD.findall(query)
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def _bm25_ranking(
    db: sqlite3.Connection, query: str, allowed: set[str] | None, k: int
) -> list[tuple[Key, float]]:
    """Chunks by BM25 (SQLite's `bm25()`, smaller is better, negated here), best first: the
    top `k` (CANDIDATES when 0)."""
    match = _fts_query(query)
    if not match:
        return []
    sql = (
        f"SELECT file, idx, bm25({FTS_TABLE}) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? "
        f"ORDER BY bm25({FTS_TABLE})"
    )
    limit = k or CANDIDATES
    if allowed is None:
        rows = db.execute(sql + " LIMIT ?", (match, limit)).fetchall()
    else:
        rows = [r for r in db.execute(sql, (match,)) if r[0] in allowed][:limit]
    return [((file, int(idx)), -float(score)) for file, idx, score in rows]


def _from_here(glob: str) -> bool:
    """Whether a --path GLOB is a path from the current directory, as a shell reads one."""
    return glob in (".", "..") or glob.startswith(("/", "./", "../"))


def _path_matches(rel: str, globs: Sequence[str], full: str = "") -> bool:
    """Whether `rel` matches one of the globs: against the whole relative path (`*` spans
    folders), a pattern without `/` also against the file name, and a folder name against
    everything under it (`docs` or `docs/`). A glob starting with `/`, `./` or `../` is a
    path from the current directory, matched the same way against the file's `full` path
    (so `--path ./sub`, typed in the indexed folder, means its `sub`)."""
    name = rel.rsplit("/", 1)[-1]
    for glob in globs:
        if _from_here(glob):
            here = os.path.realpath(glob)
            under = here.rstrip("/") + "/*"
            if full and (fnmatch.fnmatchcase(full, here) or fnmatch.fnmatchcase(full, under)):
                return True
            continue
        pattern = glob.strip("/") if glob.strip("/") else glob
        if (
            fnmatch.fnmatchcase(rel, pattern)
            or ("/" not in pattern and fnmatch.fnmatchcase(name, pattern))
            or fnmatch.fnmatchcase(rel, pattern + "/*")
        ):
            return True
    return False


def _stem(word: str) -> str:
    """A crude English stem, enough to match "renewed" with "renew" inside one chunk."""
    w = word.lower()
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def matches(query: str, passage: str) -> tuple[tuple[int, int], ...]:
    """The (start, end) character spans of `passage`'s words that are the query's words
    (stemmed as for choosing passages, stopwords left out), in order: what a reader's eye
    should land on."""
    terms = {_stem(w) for w in _WORD.findall(query) if w.lower() not in STOPWORDS}
    spans: list[tuple[int, int]] = []
    for m in _WORD.finditer(passage):
        if _stem(m.group()) not in terms:
            continue
        if spans and _JOINER.fullmatch(passage[spans[-1][1] : m.start()]):
            spans[-1] = (spans[-1][0], m.end())  # CVE-2024-1 is one match, not three
        else:
            spans.append((m.start(), m.end()))
    return tuple(spans)


def _units(text: str) -> list[tuple[int, int]]:
    """The lines of `text`, long lines cut at sentence ends: (start, end) offsets, blank
    lines left out."""
    units = []
    pos = 0
    for line in text.split("\n"):
        start = pos
        pos += len(line) + 1
        if not line.strip():
            continue
        if len(line) <= PASSAGE_CHARS:
            units.append((start, start + len(line)))
            continue
        piece = 0
        for m in _SENTENCE_END.finditer(line):
            units.append((start + piece, start + m.start()))
            piece = m.end()
        units.append((start + piece, start + len(line)))
    return [(a, b) for a, b in units if b > a]


def _windows(text: str, *, step_whole: bool) -> list[tuple[int, int]]:
    """Runs of consecutive units up to PASSAGE_CHARS: one starting at each unit, or with
    `step_whole`, back to back (fewer, for passages that are embedded)."""
    units = _units(text)
    out = []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and units[j][1] - units[i][0] <= PASSAGE_CHARS:
            j += 1
        out.append((units[i][0], units[j - 1][1]))
        i = j if step_whole else i + 1
    return out or [(0, len(text))]


def _lexical_best(query: str, text: str) -> tuple[tuple[int, int], int]:
    """The window sharing most distinct query words with the query (stemmed, stopwords out),
    among equals one whose first line shares one (so the passage and its line number start
    at the match, not lines before it), then the earliest; and how many words it shares."""
    terms = {_stem(w) for w in _WORD.findall(query) if w.lower() not in STOPWORDS}

    def shared(a: int, b: int) -> int:
        return len(terms & {_stem(w) for w in _WORD.findall(text[a:b])})

    units = dict(_units(text))
    best, best_key = (0, 0), (-1, False)
    for a, b in _windows(text, step_whole=False):
        key = (shared(a, b), shared(a, units.get(a, b)) > 0)
        if key > best_key:
            best, best_key = (a, b), key
    return best, best_key[0]


def _best_passages(
    client: embedd_client.Client | None,
    model: str,
    q: np.ndarray[Any, np.dtype[np.float32]] | None,
    query: str,
    texts: Sequence[str],
) -> list[tuple[int, str]]:
    """For each chunk text, the passage that best answers the query, as (offset in the chunk,
    passage text). By the query's words first (cheap, and what a reader scans for); a chunk
    that shares no word with the query (a match by meaning) has its passages embedded and the
    one closest to the query vector chosen, in one request at interactive priority."""
    chosen: list[tuple[int, int]] = []
    by_meaning: list[int] = []
    for i, text in enumerate(texts):
        span, shared = _lexical_best(query, text)
        chosen.append(span)
        if shared <= 0 and client is not None and q is not None:
            by_meaning.append(i)
    if by_meaning:
        assert client is not None and q is not None
        windows = {i: _windows(texts[i], step_whole=True) for i in by_meaning}
        flat = [(i, w) for i in by_meaning for w in windows[i]]
        vectors = np.asarray(
            client.embed([texts[i][a:b] for i, (a, b) in flat], model, priority="interactive",
                         truncate=True),
            dtype=np.float32,
        ).reshape(len(flat), -1)  # fmt: skip
        scores = vectors @ q
        for i in by_meaning:
            rows = [n for n, (j, _) in enumerate(flat) if j == i]
            chosen[i] = flat[max(rows, key=lambda n: scores[n])][1]
    out = []
    for text, (a, b) in zip(texts, chosen, strict=True):
        lead = len(text[a:b]) - len(text[a:b].lstrip())
        out.append((a + lead, text[a:b].strip()))
    return out
