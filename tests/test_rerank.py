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

import http.client
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cohere
import pytest
from embedd_client import Client, Ranked
from langchain_cohere import CohereRerank
from langchain_core.documents import Document
from pydantic import SecretStr

from embedd.http import api as http_api
from embedd.inference.engine import Model, ModelLoadError
from embedd.inference.pipe import PairFrame, TokenizerSpec
from embedd.inference.tokens import ModelTokenizer
from embedd.wire.errors import EmbeddError
from embedd.wire.messages import MAX_RERANK_DOCUMENTS, Limits, Rerank, parse_request
from tests.conftest import Daemon, free_port, short_tmpdir, start_daemon
from tests.gguf_models import write_qwen3

RERANKERS = Path(__file__).parent / "data" / "rerankers"
REFERENCE: dict[str, Any] = json.loads((RERANKERS / "reference.json").read_text())
PAIRS: list[dict[str, str]] = REFERENCE["pairs"]
# The daemon's model names for the generated files.
MODELS = {"bert": "bert-reranker", "xlmr": "xlmr-reranker"}
# The largest difference allowed between a score and the checkpoint's own.
TOLERANCE = 1e-3
# The window of the `short` model: documents longer than it beside a query are scored in pieces.
SHORT_WINDOW = 64

# Small enough that echoing documents back can pass it, large enough for every other answer.
MAX_RESPONSE = 65536
CONFIG = f"""
max_response = {MAX_RESPONSE}

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


@dataclass(frozen=True)
class Front:
    """The module's daemon's HTTP front (loopback TCP, with an API key)."""

    port: int
    key: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        headers = {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        reply = conn.getresponse()
        parsed = json.loads(reply.read())
        conn.close()
        return reply.status, parsed


@pytest.fixture(scope="module")
def daemon_and_front() -> Iterator[tuple[Daemon, Front]]:
    workdir = short_tmpdir()
    port = free_port()
    key_file = workdir / "key"
    d = start_daemon(
        workdir, CONFIG, extra_args=("--http", f"127.0.0.1:{port}", "--api-key-file", str(key_file))
    )
    yield d, Front(port, key_file.read_text().strip())
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def served(daemon_and_front: tuple[Daemon, Front]) -> Daemon:
    return daemon_and_front[0]


@pytest.fixture(scope="module")
def front(daemon_and_front: tuple[Daemon, Front]) -> Front:
    return daemon_and_front[1]


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


def test_jina_and_cohere_documents_may_be_objects_with_their_text() -> None:
    body = {"model": "m", "query": "q", "documents": [{"text": "a"}, "b"], "top_n": None}
    assert http_api.rerank(body, Limits()).documents == ("a", "b")


def test_an_unknown_rerank_body_key_is_refused_naming_it() -> None:
    with pytest.raises(EmbeddError) as caught:
        http_api.rerank({"model": "m", "query": "q", "documents": ["a"], "topn": 1}, Limits())
    assert caught.value.details["key"] == "topn"


def test_teis_rerank_names_its_own_keys_in_its_errors() -> None:
    with pytest.raises(EmbeddError) as caught:
        http_api.tei_rerank({"query": "q", "texts": ["a", " "]}, Limits())
    assert caught.value.details["key"] == "texts" and "texts[1]" in caught.value.message
    response = http_api.tei_error(caught.value)
    assert response.status == 422 and response.body["error_type"] == "Validation"


def test_a_pair_is_the_query_and_document_in_the_models_pair_frame() -> None:
    spec = TokenizerSpec(
        head=[101], tail=[102], max_tokens=16, longest_piece=4, nfc=False,
        trailing_space=None, space_probe=[], pair=PairFrame([0], [2, 2], [2]),
    )  # fmt: skip
    tokenizer = ModelTokenizer(spec, lambda text: [])
    assert tokenizer.pair([5, 6], [7]) == [0, 5, 6, 2, 2, 7, 2]


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


def test_an_answer_over_max_response_is_refused_before_any_work(served: Daemon) -> None:
    documents = [f"document {i} " + "x" * 1000 for i in range(MAX_RESPONSE // 1000)]
    before = served.model_stats("bert")
    error = served.call(
        "rerank", model="bert", query=QUERY, documents=documents, return_documents=True
    )["error"]
    assert error["code"] == "bad_request" and error["limit"] == MAX_RESPONSE
    assert "max_response" in error["message"]
    assert served.model_stats("bert")["pairs"] == before["pairs"]


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


def test_a_causal_reranker_is_refused_at_load_saying_what_it_is(tmp_path: Path) -> None:
    model = Model(
        write_qwen3(tmp_path / "qwen3-reranker.gguf", reranker=True),
        batch_tokens=256,
        max_tokens=None,
    )
    try:
        with pytest.raises(ModelLoadError, match="causal reranker"):
            model.new_context(threads=1, pooling=None)
    finally:
        model.close()


def test_rank_pooling_without_a_classification_head_is_refused_at_load(tmp_path: Path) -> None:
    path = write_qwen3(tmp_path / "headless.gguf", reranker=True, classifier=False)
    model = Model(path, batch_tokens=256, max_tokens=None)
    try:
        with pytest.raises(ModelLoadError, match="classification head"):
            model.new_context(threads=1, pooling=None)
    finally:
        model.close()


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


def test_a_requests_pairs_are_computed_together_in_the_models_batches(served: Daemon) -> None:
    documents = list(dict.fromkeys(p["document"] for p in PAIRS))[:40]
    before = served.model_stats("xlmr")
    served.call("rerank", model="xlmr", query=QUERY, documents=documents, cache=False)
    after = served.model_stats("xlmr")
    assert after["pairs"] - before["pairs"] == len(documents) == 40
    assert after["inputs"] - before["inputs"] == 40
    assert 0 < after["batches"] - before["batches"] < 40


def test_a_repeated_rerank_is_answered_from_the_cache(served: Daemon) -> None:
    documents = ["cached one", "cached two"]
    first = served.call("rerank", model="bert", query="cache", documents=documents)
    before = served.model_stats("bert")
    again = served.call("rerank", model="bert", query="cache", documents=documents)
    assert again["results"] == first["results"]
    assert served.model_stats("bert")["pairs"] == before["pairs"]


# --- HTTP: llama-server / Jina / Cohere shapes, and TEI's ---------------------------------------


def socket_scores(d: Daemon, model: str) -> list[tuple[int, float]]:
    answer = d.call("rerank", model=model, query=QUERY, documents=DOCUMENTS, cache=False)
    return [(r["index"], r["score"]) for r in answer["results"]]


def test_langchains_cohere_reranker_gets_the_sockets_scores(served: Daemon, front: Front) -> None:
    reranker = CohereRerank(
        model="xlmr",
        base_url=front.base_url,
        cohere_api_key=SecretStr(front.key),
        top_n=len(DOCUMENTS),
    )
    results = reranker.rerank(DOCUMENTS, QUERY)
    got = [(r["index"], r["relevance_score"]) for r in results]
    want = socket_scores(served, "xlmr")
    assert [i for i, _ in got] == [i for i, _ in want]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(got, want, strict=True))


def test_langchains_cohere_reranker_compresses_documents_best_first(
    served: Daemon, front: Front
) -> None:
    reranker = CohereRerank(
        model="bert", base_url=front.base_url, cohere_api_key=SecretStr(front.key), top_n=2
    )
    kept = reranker.compress_documents([Document(page_content=d) for d in DOCUMENTS], QUERY)
    best = socket_scores(served, "bert")[:2]
    assert [d.page_content for d in kept] == [DOCUMENTS[i] for i, _ in best]
    assert [d.metadata["relevance_score"] for d in kept] == pytest.approx([s for _, s in best])


def test_coheres_v1_client_gets_the_documents_back_on_llama_servers_route(
    served: Daemon, front: Front
) -> None:
    client = cohere.Client(api_key=front.key, base_url=front.base_url)
    answer = client.rerank(model="bert", query=QUERY, documents=DOCUMENTS, return_documents=True)
    want = socket_scores(served, "bert")
    assert [r.index for r in answer.results] == [i for i, _ in want]
    assert [r.relevance_score for r in answer.results] == pytest.approx([s for _, s in want])
    assert [r.document.text for r in answer.results if r.document] == [
        DOCUMENTS[i] for i, _ in want
    ]


def test_teis_rerank_scores_are_the_logits_sigmoid_unless_raw(served: Daemon, front: Front) -> None:
    want = socket_scores(served, "xlmr")
    body = {"model": "xlmr", "query": QUERY, "texts": DOCUMENTS, "return_text": True}
    status, rows = front.post("/rerank", body)
    assert status == 200
    assert [r["index"] for r in rows] == [i for i, _ in want]
    assert [r["score"] for r in rows] == pytest.approx([1 / (1 + math.exp(-s)) for _, s in want])
    assert [r["text"] for r in rows] == [DOCUMENTS[i] for i, _ in want]
    status, raw = front.post("/rerank", {**body, "raw_scores": True})
    assert [r["score"] for r in raw] == pytest.approx([s for _, s in want])


def test_teis_rerank_refuses_in_teis_error_shape(front: Front) -> None:
    status, error = front.post("/rerank", {"model": "xlmr", "query": QUERY, "texts": []})
    assert status == 422 and error["error_type"] == "Validation" and "texts" in error["error"]
    long_query = " ".join(["reading files line by line"] * 20)
    status, error = front.post("/rerank", {"model": "short", "query": long_query, "texts": ["a"]})
    assert status == 413 and error["error_type"] == "Validation"


def test_reranking_an_embedder_over_http_is_a_400_naming_the_model(front: Front) -> None:
    status, error = front.post("/v1/rerank", {"model": "default", "query": "q", "documents": ["d"]})
    assert status == 400
    assert error["error"]["param"] == "model" and "embedding model" in error["error"]["message"]
