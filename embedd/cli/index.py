"""What `embedd index` and `embedd search` print: the run's summary, its progress line (in
tokens, with an ETA), an index's description and the hits, as text or JSON. The work itself is
`embedd.index`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from embedd.index.fusion import BOILERPLATE_WEIGHT
from embedd.index.ingest import (
    BatchSent,
    Checking,
    Chunked,
    Counts,
    Embedded,
    Embedding,
    FileDone,
    FileSkipped,
    Finding,
    Finished,
    ProgressEvent,
    Rechunking,
    Refused,
)
from embedd.index.search import Explanation, Hit
from embedd.index.store import IndexInfo, display


def summary(counts: Counts, out: str) -> str:
    """The line `embedd index` ends with; skips are counted by reason, so a user can tell
    "3 skipped" that are binaries from 3 that could not be read; chunks whose text was
    already embedded (their vector copied) are counted apart."""
    if not counts.files_seen and not counts.files_removed:
        return f"found no files to index (nothing under the paths given) -> {out}"
    skipped = f"{counts.files_skipped} skipped"
    if counts.skipped:
        by_reason = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.skipped.items()))
        skipped += f" ({by_reason})"
    n = counts.chunks_reused
    reused = f", {n} duplicates not embedded again" if n else ""
    return (
        f"indexed {counts.files_indexed} files ({counts.chunks} chunks{reused}), "
        f"{counts.files_unchanged} unchanged, {counts.files_removed} removed, {skipped} -> {out}"
    )


# A first guess at tokens per byte of text, until chunked files give the real ratio: about 4
# characters of English per token is the usual rule of thumb for subword vocabularies (OpenAI's
# tokenizer documentation; WordPiece as in MiniLM lands close to it).
TOKENS_PER_BYTE_GUESS = 0.25
# Seconds between plain progress lines when stderr is not a terminal (a log or CI capture):
# frequent enough to show life, rare enough not to flood it.
PLAIN_EVERY = 5.0
# Seconds between redraws on a terminal: more often than this is not readable anyway, and a
# folder of tiny files would otherwise spend its time writing to the terminal.
TTY_EVERY = 0.1
# Erase from the cursor to the end of the line (ECMA-48 EL, "CSI K").
CLEAR_EOL = "\x1b[K"
# The progress line's stages before embedding (`Progress.stage`).
FINDING = "finding"
CHECKING = "checking"


def _terminal_width(stream: TextIO) -> int:
    """The width of the terminal `stream` writes to: $COLUMNS when set (as for
    shutil.get_terminal_size), else the stream's own terminal (stderr may be a terminal while
    stdout is a pipe, which is all shutil.get_terminal_size looks at), else its fallback."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return os.get_terminal_size(stream.fileno()).columns or shutil.get_terminal_size().columns
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return shutil.get_terminal_size().columns


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, its start replaced by an ellipsis (a path's tail is
    the part that says which file it is)."""
    if len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if width > 1 else text[:width]


class Progress:
    """What `index` has done and has left, in tokens: the work is embedding, and its cost is
    tokens, not files. Tokens ahead are exact for files already chunked and estimated from
    the bytes of the files not yet chunked, at the tokens-per-byte ratio measured so far; the
    ETA divides them by the tokens per second embedded so far (counted from the first batch
    sent, so reading and chunking time is part of the rate). On a terminal it is one line,
    redrawn in place and never wider than the terminal minus one column (a line filling the
    last column wraps on many terminals); otherwise a plain line every PLAIN_EVERY seconds."""

    def __init__(
        self,
        stream: TextIO | None,
        *,
        tty: bool,
        files: int = 0,
        bytes_ahead: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.tty = tty
        self.clock = clock
        self.files = files
        self.files_done = 0
        self.bytes_ahead = bytes_ahead  # of files not chunked yet
        self.bytes_chunked = 0
        self.tokens_chunked = 0
        self.tokens_done = 0
        self.chunks_done = 0
        self.current = ""
        self.embed_started: float | None = None
        self.last_draw = -float("inf")
        self.drawn = False
        # Before any embedding, the run finds the files (FINDING) and reads each to see whether
        # it changed (CHECKING): 100,000 files take seconds of each, which the line must show.
        self.stage: str | None = None
        self.found = 0
        self.checked = 0

    # -- the events of a run ----------------------------------------------------------------

    def __call__(self, event: ProgressEvent) -> None:
        """Draw what an `index_paths` run tells as it goes."""
        match event:
            case Finding(found):
                self.finding(found)
            case Checking(checked, files):
                self.files = files
                self.checking(checked)
            case Rechunking():
                self.note("the chunk settings changed: every file is chunked and embedded again")
            case FileSkipped(name, _, detail):
                self.note(f"skipped {display(name)}: {detail}")
            case Embedding(files, done, bytes_ahead):
                self.files, self.files_done, self.bytes_ahead = files, done, bytes_ahead
                self.embedding()
            case Chunked(name, size, tokens):
                self.chunked(display(name), size, tokens)
            case BatchSent():
                self.batch_started()
            case Embedded(chunks, tokens):
                self.embedded(chunks, tokens)
            case Refused(tokens):
                self.unembedded(tokens)
            case FileDone(name, size, chunked):
                self.file_done(display(name), size, chunked=chunked)
            case Finished():
                self.close()

    # -- the stages before embedding ---------------------------------------------------------

    def finding(self, found: int) -> None:
        """`found` files found so far (drawn at once when the stage begins)."""
        self.found = found
        self._stage(FINDING)

    def checking(self, checked: int) -> None:
        """`checked` of the files found read and compared with the index so far."""
        self.checked = checked
        self._stage(CHECKING)

    def embedding(self) -> None:
        """The files that changed are chunked and embedded from here on."""
        self.stage = None

    def _stage(self, stage: str) -> None:
        begins = self.stage != stage
        self.stage = stage
        self.draw(force=begins)

    # -- what happened -----------------------------------------------------------------------

    def file_done(self, name: str, size: int = 0, *, chunked: bool = False) -> None:
        """A file finished (indexed, unchanged or skipped); `size` bytes of it were still
        counted ahead unless it was `chunked` (then its tokens were)."""
        self.files_done += 1
        if not chunked:
            self.bytes_ahead = max(0, self.bytes_ahead - size)
        self.current = name
        self.draw()

    def chunked(self, name: str, size: int, tokens: int) -> None:
        """A file of `size` bytes was cut into chunks of `tokens` tokens in all."""
        self.bytes_ahead = max(0, self.bytes_ahead - size)
        self.bytes_chunked += size
        self.tokens_chunked += tokens
        self.current = name

    def batch_started(self) -> None:
        if self.embed_started is None:
            self.embed_started = self.clock()

    def embedded(self, chunks: int, tokens: int) -> None:
        """A batch came back: on a terminal always redrawn, so the line moves within a long
        file (a batch is seconds of work, not a flood of redraws)."""
        self.chunks_done += chunks
        self.tokens_done += tokens
        self.draw(force=self.tty)

    def unembedded(self, tokens: int) -> None:
        """Chunked tokens that will not be embedded after all (the daemon refused the file)."""
        self.tokens_chunked -= tokens

    # -- the figures -------------------------------------------------------------------------

    def tokens_ahead(self) -> int:
        ratio = (
            self.tokens_chunked / self.bytes_chunked
            if self.bytes_chunked
            else TOKENS_PER_BYTE_GUESS
        )
        return (self.tokens_chunked - self.tokens_done) + int(self.bytes_ahead * ratio)

    def rate(self) -> float | None:
        """Tokens embedded per second so far; None before the first batch came back."""
        if self.embed_started is None or not self.tokens_done:
            return None
        return self.tokens_done / max(self.clock() - self.embed_started, 1e-6)

    def line(self, width: int) -> str:
        if self.stage == FINDING:
            return f"finding files: {self.found:,} so far"[:width]
        if self.stage == CHECKING:
            return f"checking {self.checked:,}/{self.files:,} files for changes"[:width]
        ahead = self.tokens_ahead()
        total = self.tokens_done + ahead
        pct = 100 * self.tokens_done // total if total else 100
        rate = self.rate()
        if rate is None:
            speed, eta = "", "ETA measuring"
        else:
            speed, eta = f"  {rate:,.0f} tok/s", f"ETA {_duration(ahead / rate)}"
        about = "~" if self.bytes_ahead else ""
        text = (
            f"{pct:3d}% {self.tokens_done:,}/{about}{total:,} tokens  "
            f"{self.chunks_done:,} chunks  {self.files_done}/{self.files} files{speed}  {eta}"
        )
        room = width - len(text) - 2
        if room >= 10 and self.current:
            text += "  " + _fit(self.current, room)
        return text[:width]

    # -- output ------------------------------------------------------------------------------

    def draw(self, *, force: bool = False) -> None:
        if self.stream is None:
            return
        now = self.clock()
        if self.tty:
            if not force and now - self.last_draw < TTY_EVERY:
                return
            width = _terminal_width(self.stream) - 1
            self.stream.write("\r" + self.line(width) + CLEAR_EOL)
            self.drawn = True
        else:
            if not force and now - self.last_draw < PLAIN_EVERY:
                return
            self.stream.write(self.line(10_000) + "\n")
        self.last_draw = now
        self.stream.flush()

    def note(self, message: str) -> None:
        """A line of its own (a skipped file) that does not tear the progress line."""
        if self.stream is None:
            return
        if self.tty and self.drawn:
            self.stream.write("\r" + CLEAR_EOL)
            self.drawn = False
        self.stream.write(message + "\n")
        self.stream.flush()
        if self.tty:
            self.draw(force=True)

    def close(self) -> None:
        """Leave the terminal clean for the summary line (a plain run ends with a last line)."""
        if self.stream is None:
            return
        if self.tty:
            if self.drawn:
                self.stream.write("\r" + CLEAR_EOL)
        elif self.files:
            self.stream.write(self.line(10_000) + "\n")
        self.stream.flush()


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "?"


def describe_text(info: IndexInfo) -> str:
    size = (
        f"at most {info.chunking['chunk_tokens']} tokens"
        if info.chunking.get("chunk_tokens")
        else "the model's limit"
    )
    lines = [
        f"index     {display(info.path)}",
        f"model     {info.model} (fingerprint {info.fingerprint[:12]})",
        f"files     {len(info.files)}, {info.chunks} chunks ({size}, overlap "
        f"{info.chunking.get('overlap', 0)})",
        f"roots     {', '.join(display(r) for r in info.roots) or '?'}",
        f"created   {_when(info.created)}, updated {_when(info.updated)}",
        f"keywords  {'yes (hybrid search)' if info.keyword_search else 'no: re-run embedd index'}",
    ]
    if info.files:
        lines.append("")
        lines.extend(f"{n:6d}  {_when(t)}  {display(p)}" for p, n, t in info.files)
    return "\n".join(lines)


def _why_json(why: Explanation | None) -> dict[str, object] | None:
    if why is None:
        return None
    return {
        "lists": {
            name: {"rank": v.rank, "score": v.score, "vote": v.vote, "weight": why.weights[name]}
            for name, v in why.votes.items()
        },
        "boilerplate": why.boilerplate,
        "similar": list(why.similar),
        "adjacent": list(why.adjacent),
        "fused_rank": why.fused_rank,
        "fused_score": why.fused_score,
    }


def hits_json(hits: Sequence[Hit], *, explain: bool = False) -> str:
    """The hits as a JSON list; `matches` are [start, end] spans of the query's words in the
    passage; with `explain`, each hit's `why` (its rank, score and vote in each list)."""
    out = []
    for h in hits:
        item: dict[str, object] = {
            "path": h.path, "line": h.line, "score": h.score, "passage": h.passage,
            "matches": [list(m) for m in h.matches], "similar": h.similar, "file": h.file,
            "span": list(h.span), "text": h.text,
        }  # fmt: skip
        if explain:
            item["why"] = _why_json(h.why)
        out.append(item)
    return json.dumps(out, indent=2)


# Lines of a passage shown under each hit.
PASSAGE_LINES = 3
# Columns the passage is indented by.
PASSAGE_INDENT = 4
# How a matched word is marked: bold on a terminal (ECMA-48 SGR 1 and 22, "bold" and
# "normal intensity"), Markdown's strong emphasis elsewhere (a log, a pipe, a test).
BOLD = ("\x1b[1m", "\x1b[22m")
PLAIN_MARK = ("**", "**")


def marked(passage: str, spans: Sequence[tuple[int, int]], marks: tuple[str, str]) -> str:
    """`passage` with each span wrapped in `marks`."""
    out = []
    at = 0
    for a, b in spans:
        out += [passage[at:a], marks[0], passage[a:b], marks[1]]
        at = b
    out.append(passage[at:])
    return "".join(out)


def _cut(line: str, length: int, marks: tuple[str, str]) -> str:
    """`line` cut to `length` characters and ended with "…", never inside a mark (half an
    escape sequence would print as garbage)."""
    cut = line[:length]
    for mark in marks:
        for k in range(1, len(mark)):
            if cut.endswith(mark[:k]) and line.startswith(mark, len(cut) - k):
                cut = cut[:-k]
    return cut + "…"


def _open_mark(lines: Sequence[str], marks: tuple[str, str]) -> bool:
    """Whether the last mark opened in `lines` is not closed in them."""
    text = "".join(lines)
    if marks[0] == marks[1]:
        return text.count(marks[0]) % 2 == 1
    return text.count(marks[0]) > text.count(marks[1])


def _vote_text(name: str, why: Explanation) -> str:
    v = why.votes.get(name)
    weight = why.weights.get(name, 1.0)
    if v is None:
        return f"{name} -"
    place = f"#{v.rank} {v.score:.4f}" if v.rank else "by a neighbouring chunk"
    return f"{name} {place} (vote {v.vote:.2f} x {weight:.3g})"


def explain_text(h: Hit) -> list[str]:
    """Why `h` ranks where it does, in lines: its place, score and vote in each list, the
    fused score, and what folding and boilerplate did."""
    why = h.why
    if why is None:
        return []
    lists = " + ".join(_vote_text(name, why) for name in why.weights)
    # Several lists: their weighted votes add up to the fused score shown; one list: the
    # hit's score is that list's own; reranked: the fused list's, then the reranker's.
    score = h.score if why.fused_score is None else why.fused_score
    fused = f" -> {score:.4f}" if len(why.weights) > 1 else ""
    lines = [f"why: {lists}{fused}"]
    if why.fused_rank is not None:
        lines.append(
            f"     reranked: #{why.fused_rank} of the fused list, reranker score {h.score:.4f}"
        )
    if why.boilerplate:
        lines.append(
            f"     boilerplate: {why.boilerplate:.0%} of it recurs in other files "
            f"(score x {1 - BOILERPLATE_WEIGHT * why.boilerplate:.2f})"
        )
    if why.similar:
        lines.append(f"     folded near duplicates: {', '.join(display(p) for p in why.similar)}")
    if why.adjacent:
        chunks = ", ".join(str(i) for i in why.adjacent)
        lines.append(f"     adjacent chunks of the file folded in: {chunks}")
    return lines


def hits_text(
    hits: Sequence[Hit], width: int = 80, *, tty: bool = False, explain: bool = False
) -> str:
    """`path:line  score` and the passage below it (wrapped to the terminal, at most
    PASSAGE_LINES lines) with the query's words marked (bold on a terminal, `**word**`
    elsewhere): the form editors and terminals open at that line. A hit that stands for near
    duplicates says how many; with `explain`, why each hit ranks where it does."""
    lines = []
    wrap = max(20, width - 1 - PASSAGE_INDENT)
    marks = BOLD if tty else PLAIN_MARK
    for h in hits:
        where = f"{display(h.path)}:{h.line}" if h.line else display(h.path)
        similar = f"  (and {h.similar} similar)" if h.similar else ""
        lines.append(f"{where}  {h.score:.4f}{similar}")
        passage = textwrap.wrap(" ".join(marked(h.passage, h.matches, marks).split()), wrap)
        if len(passage) > PASSAGE_LINES:
            passage = passage[:PASSAGE_LINES]
            passage[-1] = _cut(passage[-1], wrap - 1, marks)
            if _open_mark(passage, marks):  # a terminal would stay bold past the passage
                passage[-1] += marks[1]
        lines.extend(" " * PASSAGE_INDENT + p for p in passage)
        if explain:
            lines.extend(" " * PASSAGE_INDENT + e for e in explain_text(h))
    return "\n".join(lines) if lines else "(no matching chunks in the index)"
