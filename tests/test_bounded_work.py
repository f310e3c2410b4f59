"""One client's unlucky or hostile text costs bounded work and misleads nobody: words without
separators are measured a slice at a time, `tokenize` stops once its answer could not be sent,
shutdown does not wait past its grace for a tokenization, characters the tokenizer deletes never
become windows or chunks of their own, and an index keeps a document full of them."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedd.inference.tokenizer import MAX_SLICE, WordPieceTokenizer
from tests.conftest import Daemon, cosines, short_tmpdir, start_daemon, vectors
from tests.test_tokenizer import bundled_tokenizer, bundled_vocabulary, oracle

HANGUL = "\uac00"
ZWJ = "\u200d"
SOFT_HYPHEN = "\u00ad"


class _Recording(WordPieceTokenizer):
    """The bundled vocabulary's tokenizer, noting the longest text any one call was given."""

    longest = 0

    def normalize(self, text: str) -> str:
        self.longest = max(self.longest, len(text))
        return super().normalize(text)

    def encode(self, text: str) -> list[int]:
        self.longest = max(self.longest, len(text))
        return super().encode(text)


@pytest.mark.parametrize(
    "text",
    [HANGUL * 2_000_000, "a" * 2_000_000, ("b" + ZWJ) * 1_000_000, ZWJ * 2_000_000 + " tail"],
    ids=["hangul", "one letter", "letters joined by ZWJ", "deleted characters"],
)
def test_no_call_is_given_more_than_a_slice_of_a_long_word(text: str) -> None:
    tok = _Recording(bundled_vocabulary())
    done, ids = tok.grow_prefix(text, 255)
    assert done == len(text)
    assert tok.longest <= MAX_SLICE
    assert ids == ([tok.vocab["tail"]] if text.endswith("tail") else [tok.unk_id])


@pytest.mark.parametrize("n", [99, 100, 101, 5_000, 70_000])
@pytest.mark.parametrize(
    "template",
    ["{run} x y", ", {run}", "[CLS]{run}[SEP]", "{run}\u4e2d", "a\u0301{run}."],
    ids=["then words", "after punctuation", "between special tokens", "then an ideograph", "marks"],
)
def test_a_long_word_tokenizes_as_the_reference_does(template: str, n: int) -> None:
    for run in ("x" * n, HANGUL * n, ("y" + ZWJ) * (n // 2), SOFT_HYPHEN * n + "z"):
        text = template.format(run=run)
        expected = oracle()([text])[0]
        assert bundled_tokenizer().grow_prefix(text, 10**9) == (len(text), expected)


@pytest.fixture(scope="module")
def plain() -> Iterator[Daemon]:
    d = start_daemon(short_tmpdir(), "cache_bytes = 0\nmax_response = 65536\n")
    yield d
    d.stop()


@pytest.mark.parametrize("truncate", [False, True])
def test_a_megabytes_long_word_is_one_unknown_token(plain: Daemon, truncate: bool) -> None:
    huge = plain.call("embed", input=HANGUL * 8_000_000, truncate=truncate)
    short = plain.call("embed", input="q" * 150)  # over 100 characters: [UNK] as well
    assert huge["tokens"] == short["tokens"] == [3]  # [CLS] [UNK] [SEP]
    assert cosines(vectors(huge), vectors(short))[0] >= 0.99999


def test_tokenize_refuses_ids_that_would_not_fit_the_answer(plain: Daemon) -> None:
    error = plain.call("tokenize", input=["\u4e2d" * 1_000_000])["error"]
    assert error["code"] == "bad_request" and "max_response" in error["message"]
    assert error["limit"] == 65536 // 5
    fits = plain.call("tokenize", input=["\u4e2d" * 1_000])
    assert fits["counts"] == [1_002]


def test_deleted_characters_never_become_windows_of_a_split_input(plain: Daemon) -> None:
    words = " ".join(["measured", "words", "of", "ordinary", "text"] * 84)  # 420 words
    half = len(words) // 2
    for run in (ZWJ * 200_000, SOFT_HYPHEN * 20_000, "\u0301" * 20_000):
        spoiled = words[:half] + run + words[half:]
        a = plain.call("embed", input=words, long="split")
        b = plain.call("embed", input=spoiled, long="split")
        # The same text tokens in every window that is embedded (the run only moves the window
        # boundaries, as any long word does): an empty window pooled in gave cosine 0.72.
        assert b["tokens"][0] - 2 * b["windows"][0] == a["tokens"][0] - 2 * a["windows"][0]
        assert cosines(vectors(a), vectors(b))[0] >= 0.97


def test_deleted_characters_never_become_chunks(plain: Daemon) -> None:
    text = "first paragraph of words\n\n" + ZWJ * 100_000 + "\n\nlast paragraph of words"
    chunks = plain.call("chunk", input=text, max_tokens=16)["chunks"]
    assert chunks and all(c["tokens"] > 2 for c in chunks)


def test_an_index_keeps_a_document_full_of_soft_hyphens(plain: Daemon, tmp_path: Path) -> None:
    notes = tmp_path / "notes"
    notes.mkdir()
    words = " ".join(f"word{i % 50}" for i in range(600))
    (notes / "hyphens.txt").write_text(words[:2000] + SOFT_HYPHEN * 60_000 + words[2000:])
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "index", str(notes), "--out", str(tmp_path / "i.db"),
         "--socket", str(plain.socket)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "indexed 1 files" in out.stderr and " 0 skipped" in out.stderr, out.stderr


def test_sigterm_does_not_wait_past_its_grace_for_a_long_chunking(workdir: Path) -> None:
    d = start_daemon(workdir, "shutdown_grace = 0.5\n")
    try:
        conn = d.connect()
        conn.send({"op": "chunk", "id": 1, "input": "word " * 12_000_000})
        d.wait_for(lambda s: s["chunking_inputs"] > 0, "the chunking under way")
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=120) == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
    assert "left to end with the daemon: default" in d.log()
