"""Search over an index: chunks ranked by cosine to the embedded query, by BM25 over the
words, or both, the lists fused into passages (`embedd.index.fusion`: near duplicates
folded, adjacent chunks voting together, boilerplate down-weighted); each hit shown at its
best passage (by the query's words, else by meaning) with the query's words in it found, and
its path relative to the indexed folder. A reranker (a cross-encoder the daemon serves) may
reorder the best fused candidates: it reads query and chunk together, which neither list can.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import json
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import embedd_client
import numpy as np

from embedd.index import fusion, vectors
from embedd.index.modes import DEFAULT_MODE, MODE_BM25, MODE_HYBRID, MODE_VECTOR, MODES  # noqa: F401
from embedd.index.records import model_fingerprint
from embedd.index.store import (
    FTS_TABLE,
    FTS_TOKENIZE,
    VECTOR_ITEM_BYTES,
    IndexUsageError,
    columns_of,
    display,
    mismatch,
    model_card,
    open_read_only,
    relative_paths,
    select_in,
    tables_of,
)
from embedd.index.vectors import row_key

# Chunks each list brings to fusion (at least; more when more hits are asked for): enough
# that every copy of a duplicated passage and the neighbours of the best chunks are among
# them; past a few hundred ranks a chunk stands below the list's mean and votes nothing.
CANDIDATES = 200
# (chunk, query word) pairs BM25 scores at most per query. FTS5 computes bm25() for every
# chunk holding any query word, a few microseconds each: a query with a common word ("the",
# "how") over a million chunks would score most of them. Over this many pairs the query's
# commonest words are left out (`_rare_words`), as stopwords are: a word held by thousands
# of chunks adds little to a chunk's score (BM25's inverse document frequency is the log of
# its rarity), and 5,000 scorings take about 15 ms on one busy core (tests/search_bench.py).
BM25_POSTINGS = 5_000
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
# Words whose stems are remembered: a page of hits holds a few thousand words, most of them
# recurring (a few hundred kilobytes at most).
STEMS_CACHED = 8192
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
    meaning_passages: bool = False,
) -> list[Hit]:
    """The `k` chunks of `index` that best answer `query`, best first: by `mode` ("hybrid":
    vector and BM25 rankings fused; "vector"; "bm25", which needs no daemon), among files whose
    path relative to the indexed folder matches one of the globs `paths` (all when empty; a
    glob starting with `/`, `./` or `../` is a path from the current directory).
    `note` receives a one-line remark when an old index limits what can be done (no keyword
    table yet: hybrid falls back to vectors). `rerank` names a reranker the daemon serves: the
    first `max(k, RERANK_DEPTH)` fused hits are scored by it against the query and reordered,
    and each hit's score is the reranker's. Each hit's passage is the one sharing most words
    with the query (else the chunk's first lines); with `meaning_passages`, a hit sharing no
    word with the query has its passages embedded and is shown at the one closest to the
    query (a daemon request of a few windows per such hit: tens to hundreds of milliseconds,
    worth it where a person reads the passages). Raises IndexUsageError, naming the file,
    for anything wrong with `index` (missing, a directory, not SQLite, truncated, another
    program's database, vectors of another length than the model's, another model)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if client is None and (mode != MODE_BM25 or rerank is not None):
        with embedd_client.Client(socket) as own:
            return search(
                index, query, k=k, mode=mode, paths=paths, client=own, note=note,
                rerank=rerank, meaning_passages=meaning_passages,
            )  # fmt: skip
    path = Path(index)
    shown = display(str(path))
    if not path.exists():
        raise IndexUsageError(f"no index at {shown} (build one with `embedd index`)")
    if path.is_dir():
        raise IndexUsageError(f"{shown} is a directory, not an index file")
    try:
        return _search(client, path, shown, query, k, mode, paths, note, rerank, meaning_passages)
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
    meaning_passages: bool = False,
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
        roots = json.loads(meta.get("roots", "[]"))
        # Every file's relative path only when the globs or an index without roots need them
        # (a million chunks are tens of thousands of files); else the hits' alone, below.
        files = (
            [row[0] for row in db.execute("SELECT path FROM files")] if globs or not roots else []
        )
        rel = relative_paths(files, roots)
        allowed = {f for f in files if _path_matches(rel[f], globs, f)} if globs else None
        q, lists = _lists(client, db, shown, meta, query, mode, allowed, max(k, CANDIDATES))
        weights = fusion.weights_for(query) if len(lists) > 1 else {n: 1.0 for n in lists}
        depth = k if rerank is None else max(k, RERANK_DEPTH)
        fused, details = _fused(db, lists, weights, depth, has_lines)
    finally:
        db.close()
    fused_ranks: list[int | None] = [None] * len(fused)
    fused_scores: list[float | None] = [None] * len(fused)
    reranked: list[float] = []
    if rerank is not None:
        assert client is not None
        order = _reranked(client, rerank, query, [d.text for d in details])[:k]
        fused_ranks = [i + 1 for i, _ in order]
        fused_scores = [fused[i].score for i, _ in order]
        reranked = [score for _, score in order]
        fused = [fused[i] for i, _ in order]
        details = [details[i] for i, _ in order]
    model = meta.get("model", "default")
    embedder = client if meaning_passages else None
    passages = _best_passages(embedder, model, q, query, [d.text for d in details])
    hits = []
    for n, (f, row, (offset, passage)) in enumerate(zip(fused, details, passages, strict=True)):
        file, text, line, start, end = f.key[0], row.text, row.line, row.start, row.end
        passage_line = line + text.count("\n", 0, offset) if line else 0
        unknown = [p for p in (file, *(s for s, _ in f.similar)) if p not in rel]
        if unknown:
            rel.update(relative_paths(unknown, roots))
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


def _lists(
    client: embedd_client.Client | None,
    db: sqlite3.Connection,
    shown: str,
    meta: dict[str, str],
    query: str,
    mode: str,
    allowed: set[str] | None,
    wanted: int,
) -> tuple[np.ndarray[Any, np.dtype[np.float32]] | None, dict[str, list[tuple[Key, float]]]]:
    """The query's unit vector (None in bm25 mode) and the `wanted` best chunks of each list
    the mode ranks by, vectors first."""
    q: np.ndarray[Any, np.dtype[np.float32]] | None = None
    keyword = None
    if mode == MODE_VECTOR:
        assert client is not None
        q = _query_vector(client, meta, query)
    else:
        # The daemon embeds the query while BM25 ranks here: the two waits overlap.
        embedding = None if mode == MODE_BM25 else _Beside(_query_vector, client, meta, query)
        try:
            keyword = _bm25_ranking(db, query, allowed, wanted)
        finally:
            q = None if embedding is None else embedding.result()
    lists: dict[str, list[tuple[Key, float]]] = {}
    if q is not None:
        lists[fusion.VECTOR] = vector_candidates(db, shown, q, allowed, wanted)
    if keyword is not None:
        lists[fusion.BM25] = keyword
    return q, lists


def _fused(
    db: sqlite3.Connection,
    lists: dict[str, list[tuple[Key, float]]],
    weights: dict[str, float],
    depth: int,
    has_lines: bool,
) -> tuple[list[fusion.Fused], list[_Row]]:
    """The first `depth` fused hits with their rows. Fusion reads the texts of the candidates
    it compares and every candidate's file size, nothing else; a chunk deleted since its list
    was ranked is passed over: twice the hits asked for are fused, and all of them when that
    leaves too few."""
    plan = fusion.Fusion(lists, weights=weights)
    sizes = _file_sizes(db, {key[0] for ranking in lists.values() for key, _ in ranking})
    texts = _rows(db, plan.compared, has_lines)
    chunks = {
        key: fusion.Chunk(texts[key].text if key in texts else "", sizes.get(key[0], 1))
        for ranking in lists.values()
        for key, _ in ranking
    }
    ranked = plan.fuse(chunks, limit=2 * depth)
    fused, details = _readable(db, ranked, texts, depth, has_lines)
    if len(fused) < depth and len(ranked) == 2 * depth:
        ranked = plan.fuse(chunks)
        fused, details = _readable(db, ranked, texts, depth, has_lines)
    return fused, details


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


class _Beside(threading.Thread):
    """A call run in a thread beside the caller's own work; `result()` waits for it and
    returns its value or raises its exception."""

    def __init__(self, call: Callable[..., Any], *args: Any) -> None:
        super().__init__(daemon=True)
        self._call, self._args = call, args
        self._value: Any = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._call(*self._args)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


@dataclass(frozen=True)
class _Row:
    """What a search reads of a chunk it shows or compares."""

    text: str
    start: int
    end: int
    line: int


def _rows(db: sqlite3.Connection, keys: Sequence[Key], has_lines: bool) -> dict[Key, _Row]:
    """The rows of the chunks `keys` (those no longer in the index left out), a statement for
    hundreds of them: a point lookup each costs more in Python than in SQLite."""
    line = "c.line" if has_lines else "0"
    sql = (
        f"SELECT c.file, c.idx, c.text, c.start, c.end, {line} FROM (VALUES {{marks}}) AS v "
        "JOIN chunks AS c ON c.file = v.column1 AND c.idx = v.column2"
    )
    rows = select_in(db, sql, keys, width=2)
    return {(f, int(i)): _Row(t, int(a), int(b), int(n)) for f, i, t, a, b, n in rows}


def _readable(
    db: sqlite3.Connection,
    ranked: Sequence[fusion.Fused],
    known: Mapping[Key, _Row],
    n: int,
    has_lines: bool,
) -> tuple[list[fusion.Fused], list[_Row]]:
    """The first `n` of the `ranked` hits still in the index, with their rows (from `known`
    or read)."""
    hits: list[fusion.Fused] = []
    rows: list[_Row] = []
    rest = list(ranked)
    while rest and len(hits) < n:
        batch, rest = rest[: n - len(hits)], rest[n - len(hits) :]
        read = {**known, **_rows(db, [f.key for f in batch if f.key not in known], has_lines)}
        hits.extend(f for f in batch if f.key in read)
        rows.extend(read[f.key] for f in batch if f.key in read)
    return hits, rows


def _file_sizes(db: sqlite3.Connection, files: set[str]) -> dict[str, int]:
    """How many chunks each of `files` has (fusion shows a copy at its smallest file)."""
    rows = select_in(db, "SELECT path, chunks FROM files WHERE path IN ({marks})", sorted(files))
    return {str(path): int(n) for path, n in rows}


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


def vector_candidates(
    db: sqlite3.Connection,
    shown: str,
    q: np.ndarray[Any, np.dtype[np.float32]],
    allowed: set[str] | None,
    n: int,
) -> list[tuple[Key, float]]:
    """The `n` chunks of files in `allowed` (all when None) closest to the unit query `q`,
    as ((file, idx), cosine), best first. Scored over the memory-mapped matrix beside the
    index (`embedd.index.vectors`: checked against SQLite on open, rebuilt when they differ),
    so SQLite's vector blobs are not read; from the blobs when the matrix cannot serve: an
    index written by an older version and not re-indexed since (no generation to check it
    against), or a folder where the matrix cannot be written."""
    index = _database_file(db)
    if index is None or vectors.sqlite_generation(db) is None or FTS_TABLE not in tables_of(db):
        return _sqlite_candidates(db, shown, q, allowed, n)
    try:
        with vectors.shared(index, db, len(q)) as matrix:
            keys = None if allowed is None else _row_keys(db, allowed)
            best = vectors.top(matrix, q, n, keys)
    except vectors.WrongLength as exc:
        raise IndexUsageError(
            f"{shown}: {exc} (the model's dimension); the first is {exc.first} bytes: the "
            "index is damaged, rebuild it"
        ) from None
    except OSError:
        return _sqlite_candidates(db, shown, q, allowed, n)
    places = _places(db, [key for key, _ in best])
    return [(places[key], score) for key, score in best if key in places]


def _database_file(db: sqlite3.Connection) -> Path | None:
    """The file the connection's main database is (None in memory)."""
    for _, name, file in db.execute("PRAGMA database_list"):
        if name == "main" and file:
            return Path(file)
    return None


def _row_keys(db: sqlite3.Connection, files: set[str]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The row keys of every chunk of `files`."""
    rows = select_in(db, "SELECT file, idx FROM chunks WHERE file IN ({marks})", sorted(files))
    return np.asarray([row_key(f, int(i)) for f, i in rows], dtype=np.int64)


def _places(db: sqlite3.Connection, keys: list[int]) -> dict[int, Key]:
    """(file, idx) of each row key, through the keyword table whose rowid it is."""
    sql = f"SELECT rowid, file, idx FROM {FTS_TABLE} WHERE rowid IN ({{marks}})"
    return {int(k): (str(f), int(i)) for k, f, i in select_in(db, sql, keys)}


def _sqlite_candidates(
    db: sqlite3.Connection,
    shown: str,
    q: np.ndarray[Any, np.dtype[np.float32]],
    allowed: set[str] | None,
    n: int,
) -> list[tuple[Key, float]]:
    """`vector_candidates` from SQLite's vector blobs, every one of them read."""
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
    scores = vectors.cosines(matrix, q)  # stored vectors are normalized
    order = np.argsort(-scores, kind="stable")[:n]
    return [((rows[i][0], int(rows[i][1])), float(scores[i])) for i in order]


def _identifiers(query: str) -> list[str]:
    """The query's compound identifiers (`--enable-all-static`, `CVE-2024-45491`, `ssl.conf`):
    words joined by what joins an identifier's words (_JOINER, as their marks are joined),
    each as its words separated by spaces. "domain's" is not one."""
    found = []
    for token in query.split():
        words = list(_WORD.finditer(token))
        joined = all(
            _JOINER.fullmatch(token[a.end() : b.start()]) for a, b in itertools.pairwise(words)
        )
        if len(words) > 1 and joined:
            found.append(" ".join(m.group() for m in words))
    return found


def _fts_query(words: Iterable[str], phrases: Iterable[str] = ()) -> str:
    """An FTS5 query that cannot be a syntax error: each word and phrase quoted (FTS5 strings
    double their quotes; a quoted string of several words is a phrase, matched only where
    its words stand in order), any of them may match (OR), BM25 weighing each by how rare it
    is. A phrase is scored besides its words, so the chunk holding an identifier whole
    (`--enable-all-static`) gets the rarity of the whole on top of its parts', and outranks
    chunks that hold `enable`, `all` and `static` apart."""
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in (*words, *phrases))


def _bm25_ranking(
    db: sqlite3.Connection, query: str, allowed: set[str] | None, k: int
) -> list[tuple[Key, float]]:
    """Chunks by BM25 (SQLite's `bm25()`, smaller is better, negated here), best first: the
    top `k` (CANDIDATES when 0)."""
    words = _WORD.findall(query)
    if not words:
        return []
    # The common words are left out when too many chunks hold them, and so is an identifier
    # holding one of them: matching a phrase reads the chunk lists of all of its words.
    kept = _rare_words(db, query) or words
    phrases = [p for p in _identifiers(query) if set(p.split()) <= set(kept)]
    match = _fts_query(kept, phrases)
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


def _rare_words(db: sqlite3.Connection, query: str) -> list[str] | None:
    """The query's rarer words only, when scoring every chunk that holds any
    query word would mean more than BM25_POSTINGS (chunk, word) pairs; None when that fits
    (the whole query is scored). Words are taken from the rarest while their chunk counts
    add up to BM25_POSTINGS (the rarest always): the others are left out as stopwords are.
    The counts are FTS5's own (`fts5vocab`), each word tokenized as the index tokenizes it
    (stemmed, case and accents folded), through temporary tables (the index itself may be
    open read-only)."""
    words = sorted({w for w in _WORD.findall(query)})
    if not words:
        return None
    db.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5(text, "
        f"tokenize = '{FTS_TOKENIZE}')"
    )
    db.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_terms "
        "USING fts5vocab(temp, query_words, 'instance')"
    )
    db.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.index_terms "
        f"USING fts5vocab(main, {FTS_TABLE}, 'row')"
    )
    db.execute("DELETE FROM temp.query_words")
    db.executemany("INSERT INTO temp.query_words (rowid, text) VALUES (?, ?)", enumerate(words))
    terms = db.execute("SELECT doc, term FROM temp.query_terms").fetchall()
    db.execute("DELETE FROM temp.query_words")
    marks = ",".join("?" * len(terms))
    counts = dict(
        db.execute(
            f"SELECT term, doc FROM temp.index_terms WHERE term IN ({marks})",
            [t for _, t in terms],
        ).fetchall()
    )
    chunks = {words[int(i)]: 0 for i, _ in terms}
    for i, term in terms:
        chunks[words[int(i)]] = max(chunks[words[int(i)]], int(counts.get(term, 0)))
    if sum(chunks.values()) <= BM25_POSTINGS:
        return None
    rare: list[str] = []
    total = 0
    for word, n in sorted(chunks.items(), key=lambda item: item[1]):
        if rare and total + n > BM25_POSTINGS:
            break
        rare.append(word)
        total += n
    return rare


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


@functools.lru_cache(maxsize=STEMS_CACHED)
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
    terms = _terms(query)
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


def _runs(units: Sequence[tuple[int, int]], *, step_whole: bool) -> list[tuple[int, int]]:
    """Runs of consecutive units up to PASSAGE_CHARS, as (first, past-last) unit indexes: one
    starting at each unit, or with `step_whole`, back to back (fewer, for passages that are
    embedded)."""
    out = []
    i = 0
    while i < len(units):
        j = i + 1
        while j < len(units) and units[j][1] - units[i][0] <= PASSAGE_CHARS:
            j += 1
        out.append((i, j))
        i = j if step_whole else i + 1
    return out


def _windows(text: str, *, step_whole: bool) -> list[tuple[int, int]]:
    """The runs of `_runs` as (start, end) offsets in `text` (the whole text when it has no
    units)."""
    units = _units(text)
    return [(units[i][0], units[j - 1][1]) for i, j in _runs(units, step_whole=step_whole)] or [
        (0, len(text))
    ]


def _terms(query: str) -> frozenset[str]:
    """The query's words as passages are matched against them: stemmed, stopwords out."""
    return frozenset(_stem(w) for w in _WORD.findall(query) if w.lower() not in STOPWORDS)


def _lexical_best(terms: frozenset[str], text: str) -> tuple[tuple[int, int], int]:
    """The window sharing most distinct query `terms` with the query, among equals one whose
    first line shares one (so the passage and its line number start at the match, not lines
    before it), then the earliest; and how many words it shares. Units hold every word of a
    window (what lies between them is white space), so each unit's words are stemmed once."""
    units = _units(text)
    if not units:
        return (0, len(text)), 0
    found = [terms.intersection(map(_stem, _WORD.findall(text[a:b]))) for a, b in units]
    best, best_key = (0, len(text)), (-1, False)
    for i, j in _runs(units, step_whole=False):
        key = (len(frozenset().union(*found[i:j])), bool(found[i]))
        if key > best_key:
            best, best_key = (units[i][0], units[j - 1][1]), key
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
    terms = _terms(query)
    for i, text in enumerate(texts):
        span, shared = _lexical_best(terms, text)
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
