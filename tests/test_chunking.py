"""Chunking alone, with a simple deterministic counter (one token per word piece of at most 4
characters), then with the real model's tokenizer through the daemon."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedd.inference.chunking import chunk_text, spans_cover


def count(text: str) -> int:
    """Words, each one token per 4 characters (so long words cost more, like word pieces)."""
    return sum((len(w) + 3) // 4 for w in text.split())


DOC = (
    "Embedding models have a limit.\n\n"
    "The first paragraph talks about limits. It has two sentences.\n\n"
    "A second paragraph is here; it is longer than the first one and keeps going for a while, "
    "so that it cannot fit in one chunk of a small budget. It ends. Then another sentence "
    "follows it, and another one after that.\n\n"
    "Last words."
)


def test_no_chunk_exceeds_the_budget_and_spans_are_the_exact_text() -> None:
    chunks = chunk_text(DOC, count, 12)
    assert chunks and all(c.tokens <= 12 for c in chunks)
    for c in chunks:
        assert count(DOC[c.start : c.end]) == c.tokens
        assert DOC[c.start : c.end] == DOC[c.start : c.end].strip()
    assert spans_cover(DOC, chunks)


def test_paragraphs_are_kept_whole_when_they_fit() -> None:
    chunks = chunk_text(DOC, count, 40)
    texts = [DOC[c.start : c.end] for c in chunks]
    assert texts[0].startswith("Embedding models have a limit.\n\nThe first paragraph")
    assert all("\n\n" not in t or t.count("\n\n") >= 1 for t in texts)
    assert texts[-1].endswith("Last words.")


def test_chunks_never_end_inside_a_word_when_a_boundary_exists() -> None:
    for budget in (3, 5, 8, 13):
        for c in chunk_text(DOC, count, budget):
            after = DOC[c.end : c.end + 1]
            assert after == "" or after.isspace() or not DOC[c.end - 1].isalnum(), (budget, c)


def test_a_word_longer_than_the_budget_is_cut_inside_it() -> None:
    text = "short " + "x" * 100 + " tail"
    chunks = chunk_text(text, count, 5)
    assert all(c.tokens <= 5 for c in chunks)
    assert spans_cover(text, chunks)


def test_overlap_repeats_the_end_of_the_previous_chunk_within_the_limit() -> None:
    chunks = chunk_text(DOC, count, 12, overlap=4)
    for prev, nxt in itertools.pairwise(chunks):
        assert nxt.start < prev.end  # they overlap
        assert count(DOC[nxt.start : prev.end]) <= 4
        assert nxt.start > prev.start  # and always move on


def test_chunking_is_deterministic() -> None:
    assert chunk_text(DOC, count, 9, overlap=2) == chunk_text(DOC, count, 9, overlap=2)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from("ab .\n\t"), max_size=400),
    st.integers(min_value=1, max_value=30),
    st.integers(min_value=0, max_value=10),
)
def test_any_text_is_covered_by_chunks_within_the_budget(
    text: str, budget: int, overlap: int
) -> None:
    chunks = chunk_text(text, count, budget, overlap=overlap)
    assert all(c.tokens <= budget or c.end - c.start == 1 for c in chunks)
    assert spans_cover(text, chunks)


def test_the_bundled_docs_chunk_within_the_models_limit_with_the_real_tokenizer() -> None:
    pytest.importorskip("llama_cpp")
    from embedd.config import BUNDLED_MODEL
    from embedd.inference.engine import Model

    engine = Model(BUNDLED_MODEL, batch_tokens=256, max_tokens=256)
    try:
        text = Path("README.md").read_text() if Path("README.md").exists() else DOC
        text += "\n\n" + " ".join(
            json.loads((Path("tests/data/stdlib_docs.json")).read_text())["chunks"][:20]
        )
        chunks = list(engine.chunk(text, max_tokens=64, overlap=8))
        assert chunks
        for c in chunks:
            assert len(engine.tokenize(text[c.start : c.end])[0]) <= 64
        assert spans_cover(text, chunks)
    finally:
        engine.close()
