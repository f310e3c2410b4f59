"""Rerank: cross-encoders scoring query/document pairs on llama.cpp's rank pooling.

The oracle is not llama.cpp: `tests/data/rerankers/` holds two small random-weight
cross-encoders (BERT- and XLM-RoBERTa-shaped, converted by llama.cpp's own converter) and the
scores their Hugging Face checkpoints' own forward pass gives for 330 query/document pairs in
ten scripts (`generate.py` there says how they were made). embedd's scores must be within
1e-3 of those on every pair.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedd.inference.engine import Context, Model

RERANKERS = Path(__file__).parent / "data" / "rerankers"
REFERENCE: dict[str, Any] = json.loads((RERANKERS / "reference.json").read_text())
PAIRS: list[dict[str, str]] = REFERENCE["pairs"]
NAMES = ("bert-reranker", "xlmr-reranker")
# The largest difference allowed between a score and the checkpoint's own.
TOLERANCE = 1e-3


@pytest.fixture(scope="module", params=NAMES)
def engine(request: pytest.FixtureRequest) -> Iterator[tuple[str, Model, Context]]:
    model = Model(RERANKERS / f"{request.param}.gguf", batch_tokens=512, max_tokens=None)
    context = model.new_context(threads=1, pooling=None)
    yield request.param, model, context
    context.close()
    model.close()


def test_the_pairs_cover_several_scripts() -> None:
    scripts = {pair["script"] for pair in PAIRS}
    assert {"latin", "ru_RU", "zh_CN", "ar_EG", "hi_IN", "th_TH"} <= scripts
    assert len(PAIRS) >= 300


def test_a_file_with_a_classification_head_and_no_pooling_type_is_a_reranker(
    engine: tuple[str, Model, Context],
) -> None:
    _, model, context = engine
    assert context.pooling == "rank"
    info = model.info(context.pooling, context.outputs)
    assert (info.task, info.outputs) == ("rerank", 1)
    assert info.card["task"] == "rerank"


def test_the_pair_frame_is_the_reference_tokenizers(engine: tuple[str, Model, Context]) -> None:
    name, model, context = engine
    template = model.info(context.pooling, context.outputs).card["pair_template"]
    expected = {
        "bert-reranker": "[CLS]{query}[SEP]{document}[SEP]",
        "xlmr-reranker": "<s>{query}</s></s>{document}</s>",
    }
    assert template == expected[name]


def test_every_pairs_score_is_the_checkpoints_own(engine: tuple[str, Model, Context]) -> None:
    name, model, context = engine
    tok = model.tokenizer
    scores = [
        float(context.embed([tok.pair(tok.bare(p["query"]), tok.bare(p["document"]))])[0][0])
        for p in PAIRS
    ]
    diffs = [abs(a - b) for a, b in zip(scores, REFERENCE[name]["scores"], strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    assert diffs[worst] < TOLERANCE, (PAIRS[worst]["script"], diffs[worst])
