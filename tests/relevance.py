"""Recall@5 and MRR of `embedd search` in each mode, on a relevance set of real documents.

    python -m tests.relevance [--set tests/data/relevance/debian-docs.json] [--socket PATH]

The set (a JSON file) names a corpus folder that lives on the machine (`root`, e.g.
/usr/share/doc), the files of it to index and natural questions, each with the files that
answer it. The files are copied into a temporary folder, indexed once with the real daemon
(the one at --socket, else one started here with the bundled model), and every question is
searched in every mode. A result list is read at the level of files (a file's first chunk
in the ranking is its rank), since the answers name files:
- recall@5: the share of a question's answer files among the first 5 distinct files, averaged;
- MRR: 1 / the rank of the first answer file (0 when it is not in the first RANKED_FILES).
The corpus is installed software's documentation, so it may be missing or differ elsewhere:
without its root the measurement is skipped, and files missing under it are named.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from embedd import index as idx
from embedd.cli.index import Progress

SET = Path(__file__).parent / "data" / "relevance" / "debian-docs.json"
# Results read per question: the first 5 distinct files for recall@5, and for MRR enough
# that an answer ranked low still counts (a reader would not scroll past 10 files).
CUTOFF = 5
RANKED_FILES = 10
# Chunks asked for per question: enough to hold RANKED_FILES distinct files, as long files
# give several of the top chunks.
CHUNKS_ASKED = 50


@dataclass(frozen=True)
class Question:
    question: str
    answers: frozenset[str]


@dataclass(frozen=True)
class RelevanceSet:
    root: Path
    files: list[str]
    questions: list[Question]

    def missing(self) -> list[str]:
        return [f for f in self.files if not (self.root / f).is_file()]


@dataclass(frozen=True)
class Scores:
    recall: float
    mrr: float


def load(path: Path = SET) -> RelevanceSet:
    data = json.loads(path.read_text())
    return RelevanceSet(
        Path(data["root"]),
        list(data["files"]),
        [Question(q["question"], frozenset(q["answers"])) for q in data["questions"]],
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
    """Distinct files in the order of their best chunk."""
    return list(dict.fromkeys(paths))


def score(rankings: Sequence[Sequence[str]], questions: Sequence[Question]) -> Scores:
    """Mean recall@CUTOFF and mean reciprocal rank over the questions, from each question's
    ranked distinct files."""
    recall = mrr = 0.0
    for ranking, q in zip(rankings, questions, strict=True):
        top = ranking[:RANKED_FILES]
        recall += len(q.answers & set(top[:CUTOFF])) / len(q.answers)
        first = next((i for i, f in enumerate(top, start=1) if f in q.answers), None)
        mrr += 1.0 / first if first else 0.0
    n = max(len(questions), 1)
    return Scores(recall / n, mrr / n)


def measure(
    rset: RelevanceSet, db: Path, socket: Path, modes: Sequence[str] = idx.MODES
) -> dict[str, Scores]:
    """Each mode's scores over the set's questions, searching the index `db` of its corpus."""
    out = {}
    for mode in modes:
        rankings = [
            ranked_files(
                h.path for h in idx.search(db, q.question, k=CHUNKS_ASKED, mode=mode, socket=socket)
            )
            for q in rset.questions
        ]
        out[mode] = score(rankings, rset.questions)
    return out


def table(results: dict[str, Scores], rset: RelevanceSet) -> str:
    lines = [
        f"| mode | recall@{CUTOFF} | MRR |",
        "|---|---|---|",
        *(f"| {m} | {s.recall:.3f} | {s.mrr:.3f} |" for m, s in results.items()),
    ]
    return "\n".join(lines) + (
        f"\n\n{len(rset.questions)} questions, {len(rset.files)} files ({rset.root})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.relevance", description=__doc__)
    parser.add_argument("--set", type=Path, default=SET, help="the relevance set (JSON)")
    parser.add_argument("--socket", type=Path, help="a running daemon (default: start one)")
    parser.add_argument("--chunk-tokens", type=int, help="as for `embedd index`")
    parser.add_argument("--overlap", type=int, default=0, help="as for `embedd index`")
    args = parser.parse_args(argv)
    rset = load(args.set)
    if not rset.root.is_dir():
        print(f"skipped: the corpus root {rset.root} is not on this machine", file=sys.stderr)
        return 0
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
        print(table(measure(rset, db, socket), rset))
    finally:
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
