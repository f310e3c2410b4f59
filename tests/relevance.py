"""hit@1, recall@5 and MRR@10 of `embedd search` in each mode, per kind of question and per
half of a relevance set (tuning, held-out), on real documents.

    python -m tests.relevance [--set tests/data/relevance/packages.json] [--socket PATH]
                              [--split tuning|held-out] [--round N] [--pool N]

A set (a JSON file) names a corpus folder (`root`, relative to the JSON file or absolute),
the files of it to index and questions, each with its `kind` (`paraphrase`: the answer in
other words; `exact`: an identifier, flag, error code or CVE id; `mixed`), its half
(`split`: `tuning`, the questions the ranking's constants were chosen on, or `held-out`,
not used to choose them), the `round` it was written in (a later round's questions were
written after the ranking they test), its answers and the files `judged` not to answer it.
An answer is a file, or a list of files that are copies of one document (any of them counts as
finding it). The files are copied into a temporary folder, indexed once with the real daemon
(the one at --socket, else one started here with the bundled model), and every question is
searched in every mode. A result list is read at the level of files (a file's first hit is
its rank):
- hit@1: whether the first file answers the question;
- recall@5: the share of a question's answers among the first 5 distinct files;
- MRR@10: 1 / the rank of the first answer among the first 10 files (0 when absent).
The shipped set (`packages.json`) lives in the repository; an older set over
/usr/share/doc (`debian-docs.json`) is skipped where its files are missing.

A file that states an answer but is not labelled counts against whichever mode ranks it
high, so labels are completed by pooling, as TREC does: `--pool N` prints, for every
question, the files among the first N of any mode that are neither answers nor judged, in
path order and without saying which mode ranked them, for a reader to judge against the
files. What the reader finds goes into the set: a new answer, or a `judged` file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedd import index as idx
from embedd.cli.index import Progress

HERE = Path(__file__).parent / "data" / "relevance"
SET = HERE / "packages.json"
# Results read per question: the first 5 distinct files for recall@5, and for MRR enough
# that an answer ranked low still counts (a reader would not scroll past 10 files).
CUTOFF = 5
RANKED_FILES = 10
# Hits asked for per question: enough to hold RANKED_FILES distinct files, as long files
# give several of the top hits.
CHUNKS_ASKED = 50
# How deep `--pool` reads each mode's files by default: the depth recall@CUTOFF and hit@1 see.
POOL_DEPTH = CUTOFF
# The halves of a set and the kinds of questions.
TUNING = "tuning"
HELD_OUT = "held-out"
SPLITS = (TUNING, HELD_OUT)
KINDS = ("paraphrase", "exact", "mixed")


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[frozenset[str], ...]  # each: the files that are copies of one answer
    kind: str = ""  # "" in a set without kinds
    split: str = ""  # "" in a set without halves
    judged: frozenset[str] = frozenset()  # files read and found not to answer it
    round: int = 0  # when it was written (0 in a set without rounds)

    @property
    def files(self) -> frozenset[str]:
        return frozenset().union(*self.answers)


@dataclass(frozen=True)
class RelevanceSet:
    root: Path
    files: list[str]
    questions: list[Question]

    def missing(self) -> list[str]:
        return [f for f in self.files if not (self.root / f).is_file()]

    def only(
        self, split: str | None = None, kind: str | None = None, round: int | None = None
    ) -> list[Question]:
        return [
            q
            for q in self.questions
            if (split is None or q.split == split)
            and (kind is None or q.kind == kind)
            and (round is None or q.round == round)
        ]


@dataclass(frozen=True)
class Scores:
    hit1: float
    recall: float
    mrr: float
    n: int


def _answer(value: str | list[str]) -> frozenset[str]:
    return frozenset([value] if isinstance(value, str) else value)


def load(path: Path = SET) -> RelevanceSet:
    data = json.loads(path.read_text())
    root = Path(data["root"])
    return RelevanceSet(
        root if root.is_absolute() else path.parent / root,
        list(data["files"]),
        [
            Question(
                q["question"],
                tuple(_answer(a) for a in q["answers"]),
                q.get("kind", ""),
                q.get("split", ""),
                frozenset(q.get("judged", ())),
                q.get("round", 0),
            )
            for q in data["questions"]
        ],
    )


def copy_corpus(rset: RelevanceSet, dest: Path) -> int:
    """Copy the set's files that exist under its root into `dest` (same relative paths)."""
    copied = 0
    for rel in rset.files:
        src = rset.root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest / rel)
            copied += 1
    return copied


def ranked_files(paths: Iterable[str]) -> list[str]:
    """Distinct files in the order of their best hit."""
    return list(dict.fromkeys(paths))


def score(rankings: Sequence[Sequence[str]], questions: Sequence[Question]) -> Scores:
    """Mean hit@1, recall@CUTOFF and reciprocal rank (within RANKED_FILES) over the
    questions, from each question's ranked distinct files."""
    hit1 = recall = mrr = 0.0
    for ranking, q in zip(rankings, questions, strict=True):
        top = list(ranking[:RANKED_FILES])
        first5 = set(top[:CUTOFF])
        recall += sum(1 for a in q.answers if a & first5) / len(q.answers)
        first = next((i for i, f in enumerate(top, start=1) if f in q.files), None)
        mrr += 1.0 / first if first else 0.0
        hit1 += 1.0 if first == 1 else 0.0
    n = max(len(questions), 1)
    return Scores(hit1 / n, recall / n, mrr / n, len(questions))


def rankings(
    rset: RelevanceSet,
    db: Path,
    socket: Path,
    modes: Sequence[str] = idx.MODES,
    k: int = CHUNKS_ASKED,
    rerank: str | None = None,
) -> dict[str, list[list[str]]]:
    """Each mode's ranked files for each of the set's questions (in the set's order), from
    its first `k` hits (reordered by the reranker `rerank` when given)."""

    def hits(question: str, mode: str) -> list[idx.Hit]:
        return idx.search(db, question, k=k, mode=mode, socket=socket, rerank=rerank)

    return {
        mode: [ranked_files(h.path for h in hits(q.question, mode)) for q in rset.questions]
        for mode in modes
    }


def pool(
    ranked: Mapping[str, Sequence[Sequence[str]]],
    questions: Sequence[Question],
    depth: int = POOL_DEPTH,
) -> list[list[str]]:
    """For each question, the files among the first `depth` of any mode that are neither
    among its answers nor judged not to answer it: what a judge must still read to complete
    its labels. Sorted by path, so the list does not say which mode ranked a file or how
    high."""
    return [
        sorted({f for r in ranked.values() for f in r[i][:depth]} - q.files - q.judged)
        for i, q in enumerate(questions)
    ]


def measure(
    rset: RelevanceSet, db: Path, socket: Path, modes: Sequence[str] = idx.MODES
) -> dict[str, Scores]:
    """Each mode's scores over all of the set's questions, searching the index `db`."""
    ranked = rankings(rset, db, socket, modes)
    return {mode: score(r, rset.questions) for mode, r in ranked.items()}


def breakdown(
    ranked: Mapping[str, Sequence[Sequence[str]]], rset: RelevanceSet
) -> dict[tuple[str, str, str], Scores]:
    """Scores by (split, kind, mode), with "all" for every split or kind."""
    out = {}
    for split in (*SPLITS, "all"):
        for kind in ("all", *KINDS):
            picked = [
                i
                for i, q in enumerate(rset.questions)
                if split in ("all", q.split) and kind in ("all", q.kind)
            ]
            if not picked:
                continue
            questions = [rset.questions[i] for i in picked]
            for mode, r in ranked.items():
                out[(split, kind, mode)] = score([r[i] for i in picked], questions)
    return out


def table(results: Mapping[tuple[str, str, str], Scores], rset: RelevanceSet) -> str:
    lines = [
        f"| half | kind | mode | hit@1 | recall@{CUTOFF} | MRR@{RANKED_FILES} |",
        "|---|---|---|---|---|---|",
    ]
    for (split, kind, mode), s in results.items():
        lines.append(
            f"| {split} | {kind} ({s.n}) | {mode} | {s.hit1:.3f} | {s.recall:.3f} | {s.mrr:.3f} |"
        )
    return "\n".join(lines) + (
        f"\n\n{len(rset.questions)} questions, {len(rset.files)} files ({rset.root})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.relevance", description=__doc__)
    parser.add_argument("--set", type=Path, default=SET, help="the relevance set (JSON)")
    parser.add_argument("--socket", type=Path, help="a running daemon (default: start one)")
    parser.add_argument("--chunk-tokens", type=int, help="as for `embedd index`")
    parser.add_argument("--overlap", type=int, default=0, help="as for `embedd index`")
    parser.add_argument("--split", choices=SPLITS, help="only this half of the questions")
    parser.add_argument("--round", type=int, help="only the questions written in this round")
    parser.add_argument(
        "--pool",
        type=int,
        metavar="N",
        help="print each question's unlabelled files among the first N of any mode, not scores",
    )
    parser.add_argument(
        "--rerank", metavar="MODEL", help="rerank with MODEL, a reranker the --socket daemon serves"
    )
    args = parser.parse_args(argv)
    rset = load(args.set)
    if not rset.root.is_dir():
        print(f"skipped: the corpus root {rset.root} is not on this machine", file=sys.stderr)
        return 0
    if args.split or args.round:
        rset = RelevanceSet(rset.root, rset.files, rset.only(args.split, round=args.round))
    missing = rset.missing()
    if missing:
        print(f"{len(missing)} files missing under {rset.root}: {', '.join(missing[:5])} ...",
              file=sys.stderr)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="embedd-rel"))
    daemon = None
    try:
        corpus = work / "corpus"
        copy_corpus(rset, corpus)
        socket = args.socket
        if socket is None:
            from tests.conftest import start_daemon

            daemon = start_daemon(work, "")
            socket = daemon.socket
        db = work / "corpus.db"
        idx.index_paths(
            [corpus],
            db,
            socket=socket,
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            progress=Progress(sys.stderr, tty=sys.stderr.isatty()),
        )
        ranked = rankings(rset, db, socket, rerank=args.rerank)
        if args.pool:
            unjudged = pool(ranked, rset.questions, args.pool)
            for q, files in zip(rset.questions, unjudged, strict=True):
                print(json.dumps({"question": q.question, "unjudged": files}))
        else:
            print(table(breakdown(ranked, rset), rset))
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
