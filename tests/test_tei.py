"""text-embeddings-inference's API (`/embed`, `/`, `/info`) and embedd's own `chunk` and
`tokenize` over HTTP: the pure translation alone, then the real daemon with the libraries that
speak TEI (huggingface_hub's InferenceClient, LlamaIndex, LangChain) and curl, each getting the
msgpack socket's answers."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import numpy as np
import pytest
from huggingface_hub import InferenceClient
from langchain_huggingface import HuggingFaceEndpointEmbeddings
from llama_index.embeddings.text_embeddings_inference import (  # type: ignore[import-untyped]
    TextEmbeddingsInference,
)

from embedd.http import api as http_api
from embedd.wire.errors import Code, EmbeddError
from embedd.wire.messages import Limits
from tests.conftest import (
    Reference,
    cosines,
    free_port,
    http_front_args,
    short_tmpdir,
    start_daemon,
    vectors,
)
from tests.test_http import Front
from tests.test_tokenizer import bundled_tokenizer, reference_tokenizer

# --- the translation alone ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (
            EmbeddError(Code.INPUT_TOO_LONG, "long", index=0, tokens=300, limit=256),
            413,
            "Validation",
        ),
        (EmbeddError(Code.BAD_REQUEST, "too many", key="input", limit=10), 413, "Validation"),
        (EmbeddError(Code.BAD_REQUEST, "no such prompt", key="prompt"), 422, "Validation"),
        (EmbeddError(Code.UNKNOWN_MODEL, "no such model"), 422, "Validation"),
        (EmbeddError(Code.MODEL_CRASHED, "crashed"), 424, "Backend"),
        (EmbeddError(Code.BUSY, "busy", retry_after=2.0), 429, "Overloaded"),
        (EmbeddError(Code.SHUTTING_DOWN, "draining"), 503, "Unhealthy"),
    ],
)
def test_refusals_take_teis_shape_and_status(error: EmbeddError, status: int, kind: str) -> None:
    response = http_api.tei_error(error)
    assert response.status == status
    assert response.body == {"error": error.message, "error_type": kind}
    assert ("Retry-After" in response.headers) == (error.code == Code.BUSY)


def test_tei_fields_map_onto_embedds_request() -> None:
    embed = http_api.tei_embed(
        {"inputs": "x", "normalize": False, "truncate": True, "prompt_name": "query"},
        Limits(),
        "split",
    )
    assert (embed.input, embed.normalize, embed.cuts, embed.prompt) == (
        ("x",),
        False,
        True,
        "query",
    )
    assert embed.model == "default"
    assert (
        http_api.tei_embed({"inputs": ["x"], "truncate": False}, Limits(), "split").long == "error"
    )
    assert http_api.tei_embed({"inputs": ["x"]}, Limits(), "split").long == "split"
    assert http_api.tei_embed({"inputs": "x", "model": "other"}, Limits()).model == "other"


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": "x", "truncation_direction": "left"},
        {"inputs": "x", "normalise": True},
        {"inputs": "x", "encoding_format": "base64"},
        {"texts": ["x"]},
    ],
)
def test_what_embedd_cannot_do_is_refused_naming_the_field(body: dict[str, Any]) -> None:
    with pytest.raises(EmbeddError) as info:
        http_api.tei_embed(body, Limits())
    assert http_api.tei_error(info.value).status == HTTPStatus.UNPROCESSABLE_ENTITY


# Texts whose normalisation moves characters: accents stripped, a dotted capital I lowered
# into two characters, ideographs split, an emoji that is [UNK], a special token written out.
SPAN_TEXTS = [
    "Café déjà vu, naïve İstanbul ΣΑΣ",
    "日本語のテキスト and unaffable xyzqqqq",
    "emoji 🎉 ok\u200b, tabs\tand\nnewlines",
    "a [SEP] b",
]


def test_each_tokens_span_is_the_reference_tokenizers_offsets() -> None:
    ours, ref = bundled_tokenizer(), reference_tokenizer()
    for text in SPAN_TEXTS:
        spans = ours.encode_with_spans(text)
        expected = ref.encode(text, add_special_tokens=False)
        assert spans is not None
        assert [(i, s, e) for i, s, e, _special in spans] == [
            (i, s, e) for i, (s, e) in zip(expected.ids, expected.offsets, strict=True)
        ], text


# --- the daemon -------------------------------------------------------------------------------

MAX_INPUTS = 50


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    workdir = short_tmpdir()
    port = free_port()
    d = start_daemon(
        workdir,
        # The default model (the one the TEI routes use) with a prompt, so that one model
        # serves every test.
        f"max_inputs = {MAX_INPUTS}\n[models.default]\npath = '{{bundled}}'\nmax_tokens = 256\n"
        "[models.default.prompts]\nquery = 'query: '\n",
        extra_args=http_front_args(workdir, port),
    )
    yield Front(d, port, (workdir / "key").read_text().strip())
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def socket_vectors(front: Front, texts: list[str], **args: Any) -> np.ndarray:
    return vectors(front.daemon.call("embed", input=texts, **args))


def test_huggingface_hubs_inference_client_gets_the_socket_vectors(
    front: Front, reference: Reference
) -> None:
    # huggingface_hub posts feature extraction to the base URL itself, as TEI serves it.
    client = InferenceClient(base_url=f"http://127.0.0.1:{front.port}", api_key=front.key)
    texts = reference.queries[:4]
    got = client.feature_extraction(texts)
    assert got.shape == (4, 384)
    assert cosines(got, socket_vectors(front, texts)).min() >= 0.99999
    assert cosines(got, reference.q_vecs[:4]).min() >= 0.9999
    one = client.feature_extraction(texts[0], normalize=False)
    assert cosines(one, socket_vectors(front, texts[:1], normalize=False)).min() >= 0.99999


def test_llamaindexs_text_embeddings_inference_gets_the_socket_vectors(
    front: Front, reference: Reference
) -> None:
    model = TextEmbeddingsInference(
        model_name="default", base_url=f"http://127.0.0.1:{front.port}", auth_token=front.key
    )
    texts = reference.chunks[:3]
    got = np.array(model.get_text_embedding_batch(texts), np.float32)
    assert cosines(got, socket_vectors(front, texts)).min() >= 0.99999
    query = np.array([model.get_query_embedding(reference.queries[0])], np.float32)
    assert cosines(query, socket_vectors(front, reference.queries[:1])).min() >= 0.99999


def test_langchains_huggingface_endpoint_embeddings_gets_the_socket_vectors(
    front: Front, reference: Reference
) -> None:
    # langchain-huggingface 1.2.3 takes only a Hub repo id as `model`, never a URL: a
    # self-hosted TEI (or embedd) is reached by giving it huggingface_hub's client for it.
    lc = HuggingFaceEndpointEmbeddings(model="sentence-transformers/all-MiniLM-L6-v2")
    lc.client = InferenceClient(base_url=f"http://127.0.0.1:{front.port}", api_key=front.key)
    texts = reference.queries[4:7]
    got = np.array(lc.embed_documents(texts), np.float32)
    assert cosines(got, socket_vectors(front, texts)).min() >= 0.99999
    query = np.array([lc.embed_query(texts[0])], np.float32)
    assert cosines(query, got[:1]).min() >= 0.99999


def test_embed_takes_teis_options(front: Front) -> None:
    long = "word " * 400
    status, cut = front.call("POST", "/embed", {"inputs": [long], "truncate": True})
    assert status == 200
    assert (
        cosines(np.array(cut, np.float32), socket_vectors(front, [long], truncate=True))[0]
        >= 0.99999
    )
    status, query = front.call("POST", "/embed", {"inputs": "x", "prompt_name": "query"})
    want = socket_vectors(front, ["x"], prompt="query")
    assert status == 200 and cosines(np.array(query, np.float32), want)[0] >= 0.99999
    # Without `truncate`, the model's http_long (split): the whole text's vector.
    status, split = front.call("POST", "/embed", {"inputs": long})
    whole = socket_vectors(front, [long], long="split")
    assert status == 200 and cosines(np.array(split, np.float32), whole)[0] >= 0.99999


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"inputs": "word " * 400, "truncate": False}, 413, "256"),
        ({"inputs": ["x"] * (MAX_INPUTS + 1)}, 413, f"limit of {MAX_INPUTS}"),
        ({"inputs": "x", "prompt_name": "passage"}, 422, "no prompt 'passage'"),
        ({"inputs": ""}, 422, "empty"),
        ({"inputs": "x", "model": "nope"}, 422, "nope"),
    ],
)
def test_embed_refusals_have_teis_shape(
    front: Front, body: dict[str, Any], status: int, says: str
) -> None:
    got, answer = front.call("POST", "/embed", body)
    assert got == status and answer["error_type"] == "Validation" and says in answer["error"]


def test_a_body_that_is_not_json_gets_teis_shape(front: Front) -> None:
    head = b"POST /embed HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\n\r\n"
    reply = front.raw(head + b"{x]")
    assert reply.startswith(b"HTTP/1.1 422")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error_type"] == "Validation"


def test_info_describes_the_default_model(front: Front) -> None:
    status, info = front.call("GET", "/info")
    assert status == 200
    assert info["model_id"] == "default" and info["model_dtype"] == "float16"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256 and info["max_batch_tokens"] >= 256
    assert info["max_client_batch_size"] == MAX_INPUTS


def test_v1_chunk_and_v1_tokenize_answer_as_the_socket(front: Front, reference: Reference) -> None:
    text = "\n\n".join(reference.chunks[:3])
    status, chunked = front.call("POST", "/v1/chunk", {"input": text, "max_tokens": 64})
    socket = front.daemon.call("chunk", input=text, max_tokens=64)
    assert status == 200 and chunked == {k: v for k, v in socket.items() if k not in ("id", "ok")}
    assert all(text[c["span"][0] : c["span"][1]] == c["text"] for c in chunked["chunks"])
    status, tokens = front.call("POST", "/v1/tokenize", {"input": ["hi", "a b"]})
    socket = front.daemon.call("tokenize", input=["hi", "a b"])
    assert status == 200 and tokens["ids"] == socket["ids"] == [
        [101, 7632, 102],
        [101, 1037, 1038, 102],
    ]
    status, refused = front.call("POST", "/v1/chunk", {"input": text, "max_tokens": 2})
    assert status == 400 and refused["error"]["param"] == "max_tokens"


def test_tokenize_gives_teis_tokens_with_byte_offsets(front: Front, reference: Reference) -> None:
    texts = [*SPAN_TEXTS, *reference.queries[:20]]
    status, answer = front.call("POST", "/tokenize", {"inputs": texts})
    assert status == 200
    socket = front.daemon.call("tokenize", input=texts)
    assert [[t["id"] for t in tokens] for tokens in answer] == socket["ids"]
    for text, tokens in zip(texts, answer, strict=True):
        data = text.encode()
        assert tokens[0] == {
            "id": 101,
            "text": "[CLS]",
            "special": True,
            "start": None,
            "stop": None,
        }
        for t in tokens[1:-1]:
            assert data[t["start"] : t["stop"]].decode() == t["text"]
    status, prompted = front.call(
        "POST", "/tokenize", {"inputs": "x", "prompt_name": "query", "add_special_tokens": False}
    )
    spans = [(t["text"], t["start"], t["stop"]) for t in prompted[0]]
    assert status == 200 and spans == [("query", 0, 5), (":", 5, 6), ("x", 7, 8)]
    status, bare = front.call(
        "POST", "/tokenize", {"inputs": "The cat sat.", "add_special_tokens": False}
    )
    assert status == 200 and [t["text"] for t in bare[0]] == ["The", "cat", "sat", "."]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_chunks_a_document(front: Front) -> None:
    text = "First paragraph here.\n\nSecond paragraph, a little longer than the first one."
    out = subprocess.run(
        ["curl", "-sf", "--unix-socket", str(front.http_socket), "http://embedd/v1/chunk",
         "-d", json.dumps({"input": text, "max_tokens": 8})],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    chunks = json.loads(out.stdout)["chunks"]
    assert len(chunks) > 1 and all(text[a:b] == c["text"] for c in chunks for a, b in [c["span"]])
