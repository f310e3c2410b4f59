"""Rerank: cross-encoders scoring query/document pairs on llama.cpp's rank pooling.

The oracle is not llama.cpp: `tests/data/rerankers/` holds two small random-weight
cross-encoders (BERT- and XLM-RoBERTa-shaped, converted by llama.cpp's own converter) and the
scores their Hugging Face checkpoints' own forward pass gives for 330 query/document pairs in
ten scripts (`generate.py` there says how they were made). Through the daemon's socket,
embedd's scores must be within 1e-3 of those on every pair. One daemon serves the module: the
bundled embedder, both rerankers, and the BERT one again with a 64-token window (long
documents).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from embedd_client import Client, Ranked

from embedd.wire.errors import EmbeddError
from embedd.wire.messages import MAX_RERANK_DOCUMENTS, Limits, Rerank, parse_request
from tests.conftest import Daemon, short_tmpdir, start_daemon

RERANKERS = Path(__file__).parent / "data" / "rerankers"
REFERENCE: dict[str, Any] = json.loads((RERANKERS / "reference.json").read_text())
PAIRS: list[dict[str, str]] = REFERENCE["pairs"]
# The daemon's model names for the generated files.
MODELS = {"bert": "bert-reranker", "xlmr": "xlmr-reranker"}
# The largest difference allowed between a score and the checkpoint's own.
TOLERANCE = 1e-3
# The window of the `short` model: documents longer than it beside a query are scored in pieces.
SHORT_WINDOW = 64

CONFIG = f"""
[models.default]
path = "{{bundled}}"

[models.bert]
path = "{RERANKERS / "bert-reranker.gguf"}"

[models.xlmr]
path = "{RERANKERS / "xlmr-reranker.gguf"}"

[models.short]
path = "{RERANKERS / "bert-reranker.gguf"}"
max_tokens = {SHORT_WINDOW}
"""

QUERY = "how do I read a file line by line"
DOCUMENTS = [
    "Open the file and iterate over it: each iteration yields one line.",
    "The sqlite3 module provides a DB-API 2.0 interface for SQLite databases.",
    "Return a list of the lines in the string, breaking at line boundaries.",
]


@pytest.fixture(scope="module")
def served() -> Iterator[Daemon]:
    workdir = short_tmpdir()
    d = start_daemon(workdir, CONFIG)
    yield d
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(served: Daemon) -> Iterator[Client]:
    with Client(served.socket) as c:
        yield c


def scores_of(d: Daemon, model: str, pairs: list[dict[str, str]]) -> list[float]:
    """Each pair's score, one rerank request per pair, sent a hundred at a time (fewer than the
    daemon's default `max_inflight` per connection) before their answers are read."""
    answers = []
    with d.connect() as conn:
        for start in range(0, len(pairs), 100):
            ids = [
                conn.request("rerank", model=model, query=p["query"], documents=[p["document"]])
                for p in pairs[start : start + 100]
            ]
            answers += [conn.recv_for(i) for i in ids]
    assert all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:1]
    return [a["results"][0]["score"] for a in answers]


# --- the request, as a pure object ------------------------------------------------------------


def parse(**args: Any) -> Rerank:
    request = parse_request({"id": 1, "op": "rerank", **args}, Limits())
    assert isinstance(request.args, Rerank)
    return request.args


def test_a_rerank_request_takes_a_query_and_documents() -> None:
    args = parse(model="bert", query="q", documents=["a", "b"], top_n=1, return_documents=True)
    assert (args.query, args.documents, args.top_n, args.return_documents) == (
        "q",
        ("a", "b"),
        1,
        True,
    )


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({"documents": ["a"]}, "query"),
        ({"query": "  ", "documents": ["a"]}, "query"),
        ({"query": "q"}, "documents"),
        ({"query": "q", "documents": []}, "documents"),
        ({"query": "q", "documents": ["a", ""]}, "documents"),
        ({"query": "q", "documents": "a"}, "documents"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ({"query": "q", "documents": ["a"], "return_documents": 1}, "return_documents"),
    ],
)
def test_a_malformed_rerank_request_is_refused_naming_its_key(
    args: dict[str, Any], key: str
) -> None:
    with pytest.raises(EmbeddError) as caught:
        parse(**args)
    assert caught.value.details["key"] == key


def test_more_documents_than_the_limit_are_refused_naming_it() -> None:
    with pytest.raises(EmbeddError) as caught:
        parse(query="q", documents=["d"] * (MAX_RERANK_DOCUMENTS + 1))
    assert caught.value.details["limit"] == MAX_RERANK_DOCUMENTS
    assert "MAX_RERANK_DOCUMENTS" in caught.value.message


# --- scores against the checkpoints' own forward pass ----------------------------------------


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_pairs_score_is_the_checkpoints_own(served: Daemon, model: str) -> None:
    scores = scores_of(served, model, PAIRS)
    diffs = [abs(a - b) for a, b in zip(scores, REFERENCE[MODELS[model]]["scores"], strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    assert diffs[worst] < TOLERANCE, (PAIRS[worst]["script"], diffs[worst])


def test_the_pairs_cover_several_scripts() -> None:
    scripts = {pair["script"] for pair in PAIRS}
    assert {"latin", "ru_RU", "zh_CN", "ja_JP", "ar_EG", "hi_IN", "th_TH"} <= scripts
    assert len(PAIRS) >= 300


def test_a_documents_score_does_not_depend_on_the_others_in_its_request(served: Daemon) -> None:
    query = PAIRS[0]["query"]
    documents = [p["document"] for p in PAIRS if p["script"] == "latin"][:8]
    alone = scores_of(served, "xlmr", [{"query": query, "document": d} for d in documents])
    together = served.call("rerank", model="xlmr", query=query, documents=documents, cache=False)
    for result in together["results"]:
        assert abs(result["score"] - alone[result["index"]]) < TOLERANCE


# --- the answer -------------------------------------------------------------------------------


def test_results_come_best_first_each_with_its_documents_index(served: Daemon) -> None:
    answer = served.call("rerank", model="bert", query=QUERY, documents=DOCUMENTS)
    assert answer["ok"]
    results = answer["results"]
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all("document" not in r for r in results)
    assert answer["pieces"] == [1, 1, 1]
    assert answer["usage"]["prompt_tokens"] == sum(answer["tokens"])


def test_top_n_keeps_the_best_n(served: Daemon) -> None:
    full = served.call("rerank", model="bert", query=QUERY, documents=DOCUMENTS)["results"]
    top = served.call("rerank", model="bert", query=QUERY, documents=DOCUMENTS, top_n=2)
    assert top["results"] == full[:2]


def test_return_documents_puts_each_documents_text_beside_its_score(served: Daemon) -> None:
    answer = served.call(
        "rerank", model="xlmr", query=QUERY, documents=DOCUMENTS, return_documents=True
    )
    assert all(r["document"] == DOCUMENTS[r["index"]] for r in answer["results"])


def test_the_client_returns_ranked_documents(served: Daemon, client: Client) -> None:
    ranked = client.rerank(QUERY, DOCUMENTS, model="bert", top_n=2, return_documents=True)
    wire = served.call("rerank", model="bert", query=QUERY, documents=DOCUMENTS, top_n=2)
    assert ranked == [
        Ranked(r["index"], r["score"], DOCUMENTS[r["index"]]) for r in wire["results"]
    ]


# --- long documents ---------------------------------------------------------------------------


def test_a_document_longer_than_the_window_scores_as_its_best_piece(served: Daemon) -> None:
    paragraphs = [p["document"] for p in PAIRS if p["script"] == "latin"][:6]
    long_document = "\n\n".join(paragraphs)
    answer = served.call("rerank", model="short", query=QUERY, documents=[long_document])
    assert answer["ok"] and answer["pieces"][0] > 1
    # The pieces, as the daemon cuts them: the window less the pair's frame and the query.
    query_tokens = len(served.call("tokenize", model="short", input=QUERY)["ids"][0]) - 2
    room = SHORT_WINDOW - 3 - query_tokens
    pieces = served.call("chunk", model="short", input=long_document, max_tokens=room + 2)
    texts = [c["text"] for c in pieces["chunks"]]
    assert len(texts) == answer["pieces"][0]
    each = served.call("rerank", model="short", query=QUERY, documents=texts)["results"]
    assert abs(answer["results"][0]["score"] - each[0]["score"]) < TOLERANCE


def test_a_query_longer_than_half_the_window_is_refused_never_cut(served: Daemon) -> None:
    long_query = " ".join(["reading files line by line"] * 20)
    error = served.call("rerank", model="short", query=long_query, documents=["a file"])["error"]
    assert error["code"] == "input_too_long" and error["key"] == "query"
    assert error["limit"] == SHORT_WINDOW // 2


# --- what a model is --------------------------------------------------------------------------


def test_the_model_card_says_whether_a_model_embeds_or_reranks(served: Daemon) -> None:
    for name in ("default", "bert", "xlmr"):
        assert served.call("load", model=name)["ok"]
    cards = {m["name"]: m for m in served.call("models")["models"]}
    assert cards["default"]["task"] == "embed"
    assert cards["bert"]["task"] == cards["xlmr"]["task"] == "rerank"
    assert cards["bert"]["pair_template"] == "[CLS]{query}[SEP]{document}[SEP]"
    assert cards["xlmr"]["pair_template"] == "<s>{query}</s></s>{document}</s>"


def test_embedding_with_a_reranker_is_a_clear_error(served: Daemon) -> None:
    error = served.call("embed", model="bert", input="hello")["error"]
    assert error["code"] == "bad_request" and error["key"] == "model"
    assert "'bert' is a reranker" in error["message"]


def test_reranking_with_an_embedder_is_a_clear_error(served: Daemon) -> None:
    error = served.call("rerank", model="default", query="q", documents=["d"])["error"]
    assert error["code"] == "bad_request" and error["key"] == "model"
    assert "'default' is an embedding model" in error["message"]


# --- scheduling, stats and the cache -----------------------------------------------------------


def test_stats_count_rerank_requests_and_their_pairs(served: Daemon) -> None:
    before = served.model_stats("xlmr")
    served.call("rerank", model="xlmr", query="stats", documents=["one", "two", "three"])
    after = served.model_stats("xlmr")
    assert after["reranks"] == before["reranks"] + 1
    assert after["pairs"] == before["pairs"] + 3
    assert after["requests"] == before["requests"] + 1


def test_a_repeated_rerank_is_answered_from_the_cache(served: Daemon) -> None:
    documents = ["cached one", "cached two"]
    first = served.call("rerank", model="bert", query="cache", documents=documents)
    before = served.model_stats("bert")
    again = served.call("rerank", model="bert", query="cache", documents=documents)
    assert again["results"] == first["results"]
    assert served.model_stats("bert")["pairs"] == before["pairs"]
