"""Compact vectors (`precision`): float16 and sign bits packed 8 a byte, exactly as
sentence-transformers' `quantize_embeddings` packs them (its own bytes, computed once by
tests/st_quantized.py, are in tests/data/st_quantized.npz), from the pure packing to the
daemon's answers on the msgpack socket, the client and the HTTP routes."""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from typing import Any

import embedd_client as ec
import numpy as np
import numpy.typing as npt
import openai
import pytest

from embedd.daemon.ops import msgpack_sizing
from embedd.http import api as http_api
from embedd.wire import precision as compact
from embedd.wire.errors import EmbeddError
from embedd.wire.messages import Embed, Limits
from tests.conftest import DATA, Reference, free_port, short_tmpdir, start_daemon, vectors
from tests.test_http import Front

ST = np.load(DATA / "st_quantized.npz")


def st_ubinary(v: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """sentence-transformers' `ubinary`, restated (the first tests show it is its bytes)."""
    return np.packbits(v > 0, axis=-1)


def st_binary(v: npt.NDArray[np.float32]) -> npt.NDArray[np.int8]:
    return (np.packbits(v > 0, axis=-1).astype(int) - 128).astype(np.int8)


# --- the packing alone --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["queries", "chunks"])
@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_packing_is_sentence_transformers_bytes_on_the_reference_vectors(
    name: str, precision: str
) -> None:
    vecs = np.load(DATA / f"st_{name}.npy")
    expected = ST[f"{name}_{precision}"]
    ours = compact.quantize(vecs, precision)
    assert ours.dtype == expected.dtype and np.array_equal(ours, expected)
    restated = st_binary(vecs) if precision == "binary" else st_ubinary(vecs)
    assert np.array_equal(restated, expected)


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_zeros_of_both_signs_are_0_bits_subnormals_count_and_the_last_byte_is_padded(
    precision: str,
) -> None:
    ours = compact.quantize(ST["edge"], precision)
    assert ours.shape == (5, 2) and np.array_equal(ours, ST[f"edge_{precision}"])
    # 0.0, -0.0, +tiny, -tiny, 1, -1, .5, -.5 | 0, 2, -2, 3, 0 and 3 padding bits
    assert compact.quantize(ST["edge"][:1], "ubinary").tolist() == [[0b00101010, 0b01010000]]


def test_float16_is_the_float32_vector_rounded_to_nearest() -> None:
    vecs = np.load(DATA / "st_queries.npy")[:20]
    half = compact.quantize(vecs, "float16")
    assert half.dtype == np.float16 and np.array_equal(half, vecs.astype(np.float16))
    assert np.frombuffer(compact.to_bytes(vecs, "float16"), "<f2").shape == (20 * 384,)


def test_an_unknown_precision_is_refused_naming_the_choices() -> None:
    with pytest.raises(EmbeddError) as info:
        Embed.parse({"input": "x", "precision": "int4"}, Limits())
    assert info.value.details["key"] == "precision"
    assert "float32, float16, binary, ubinary" in info.value.message


def test_answers_are_sized_by_their_compact_bytes() -> None:
    assert msgpack_sizing("f32", "float32").size(10, 384) == 10 * 384 * 4
    assert msgpack_sizing("f32", "float16").size(10, 384) == 10 * 384 * 2
    assert msgpack_sizing("f32", "ubinary").size(10, 384) == 10 * 48
    assert msgpack_sizing("f32", "binary").size(1, 13) == 2  # the padded last byte counts
    # JSON: a float's longest text, or "-128," for each byte of 8 signs.
    assert http_api.answer_sizing("float", "float16").float_bytes == http_api.JSON_FLOAT_BYTES
    assert http_api.answer_sizing("float", "binary").float_bytes == 5 / 8
    assert http_api.answer_bytes(1, 384, "base64", "ubinary") < 48 * 4 / 3 + 600


# --- the daemon ---------------------------------------------------------------------------------

# Small enough that 60 float32 vectors of 384 (92,160 bytes) are refused and 40 are not.
MAX_RESPONSE = 64 * 1024


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    workdir = short_tmpdir()
    d = start_daemon(
        workdir,
        f"max_response = {MAX_RESPONSE}\n",  # the cache is on (the default)
        extra_args=("--http-socket", str(workdir / "http.sock")),
    )
    yield Front(d, free_port(), "")
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


def compact_rows(response: dict[str, Any]) -> npt.NDArray[Any]:
    assert response["ok"], response
    dtype = compact.DTYPES[response["precision"]]
    width = compact.row_width(response["precision"], response["dim"])
    return np.frombuffer(response["embeddings"], dtype).reshape(response["count"], width)


def test_the_daemons_packed_signs_are_sentence_transformers_packing_of_its_float32_vectors(
    front: Front, reference: Reference
) -> None:
    texts = reference.queries[:40]
    daemon = front.daemon
    answers = {p: daemon.call("embed", input=texts, precision=p) for p in compact.PRECISIONS}
    # The first request computed the vectors; the others were served from the cache, which
    # holds float32: one text asked for in several precisions is computed once.
    assert daemon.call("stats")["cache"]["hits"] >= 3 * len(texts)
    f32 = vectors(answers["float32"])
    assert np.array_equal(compact_rows(answers["ubinary"]), st_ubinary(f32))
    assert np.array_equal(compact_rows(answers["binary"]), st_binary(f32))
    assert np.array_equal(compact_rows(answers["float16"]), f32.astype(np.float16))
    assert {a["precision"] for a in answers.values()} == set(compact.PRECISIONS)
    assert all(a["dim"] == 384 and a["count"] == 40 for a in answers.values())


def test_packed_signs_agree_with_the_reference_vectors_wherever_the_signs_agree(
    front: Front, reference: Reference
) -> None:
    texts = reference.chunks[:6]
    ours = compact_rows(front.daemon.call("embed", input=texts, precision="ubinary"))
    ref = reference.c_vecs[:6]
    f32 = vectors(front.daemon.call("embed", input=texts))  # the same vectors, from the cache
    same_sign = (f32 > 0) == (ref > 0)
    # Components within float noise of zero may take either sign; nearly all agree.
    assert same_sign.mean() > 0.999
    bits = np.unpackbits(ours, axis=-1)
    ref_bits = np.unpackbits(ST["chunks_ubinary"][:6], axis=-1)
    assert np.array_equal(bits[same_sign], ref_bits[same_sign])


def test_the_bits_of_a_normalized_vector_are_the_bits_of_the_unnormalized_one(
    front: Front, reference: Reference
) -> None:
    texts = reference.queries[100:120]
    normal = front.daemon.call("embed", input=texts, precision="binary")
    raw = front.daemon.call("embed", input=texts, precision="binary", normalize=False)
    assert np.array_equal(compact_rows(normal), compact_rows(raw))
    unnormalized = vectors(front.daemon.call("embed", input=texts, normalize=False))
    assert np.linalg.norm(unnormalized, axis=1).min() > 1.5  # really another scale


def test_max_response_counts_the_compact_answer(front: Front, reference: Reference) -> None:
    texts = reference.queries[200:260]
    refused = front.daemon.call("embed", input=texts)
    assert not refused["ok"] and refused["error"]["limit"] == MAX_RESPONSE
    answer = front.daemon.call("embed", input=texts, precision="ubinary")
    assert compact_rows(answer).shape == (60, 48)
    listed = front.daemon.call("embed", input=texts[:3], precision="binary", encoding="list")
    assert np.array_equal(
        np.array(listed["embeddings"], np.int8), st_binary(vectors_of(front, texts[:3]))
    )


def vectors_of(front: Front, texts: list[str]) -> npt.NDArray[np.float32]:
    return vectors(front.daemon.call("embed", input=texts))


def test_the_client_returns_float16_int8_and_uint8_arrays(
    front: Front, reference: Reference
) -> None:
    texts = reference.queries[:3]
    with ec.Client(front.daemon.socket) as client:
        f32 = client.embed(texts)
        half = client.embed(texts, precision="float16")
        signed = client.embed(texts, precision="binary")
        unsigned = client.embed(texts, precision="ubinary")
        one = client.embed(texts[0], precision="ubinary")
    assert half.dtype == np.float16 and signed.dtype == np.int8 and unsigned.dtype == np.uint8
    assert half.shape == (3, 384) and signed.shape == unsigned.shape == (3, 48)
    assert np.array_equal(half, f32.astype(np.float16))
    assert np.array_equal(signed, st_binary(f32)) and np.array_equal(unsigned, st_ubinary(f32))
    assert one.shape == (48,) and np.array_equal(one, unsigned[0])


def test_the_openai_route_gives_compact_vectors_as_json_numbers_and_base64(
    front: Front, reference: Reference
) -> None:
    texts = reference.queries[:4]
    f32 = vectors_of(front, texts)
    for precision, want in (("binary", st_binary(f32)), ("float16", f32.astype(np.float16))):
        body = {"model": "default", "input": texts, "precision": precision}
        status, listed = front.call("POST", "/v1/embeddings", {**body, "encoding_format": "float"})
        assert status == 200
        assert np.array_equal(np.array([d["embedding"] for d in listed["data"]], want.dtype), want)
        status, packed = front.call("POST", "/v1/embeddings", {**body, "encoding_format": "base64"})
        rows = [np.frombuffer(base64.b64decode(d["embedding"]), want.dtype) for d in packed["data"]]
        assert status == 200 and np.array_equal(np.stack(rows), want)


def test_the_openai_sdk_takes_precision_as_an_extra_body_field(
    front: Front, reference: Reference
) -> None:
    # The SDK decodes base64 as float32 itself, so compact vectors are asked for as numbers.
    client = openai.OpenAI(base_url="http://unused/v1", api_key="-", http_client=_unix_http(front))
    texts = reference.queries[:2]
    answer = client.embeddings.create(
        model="default", input=texts, encoding_format="float", extra_body={"precision": "ubinary"}
    )
    got = np.array([d.embedding for d in answer.data], np.uint8)
    assert np.array_equal(got, st_ubinary(vectors_of(front, texts)))


def _unix_http(front: Front) -> Any:
    import httpx

    return httpx.Client(transport=httpx.HTTPTransport(uds=str(front.http_socket)))


def test_the_ollama_route_takes_precision_as_an_extra(front: Front, reference: Reference) -> None:
    texts = reference.queries[:2]
    status, answer = front.call(
        "POST", "/api/embed", {"model": "default", "input": texts, "precision": "ubinary"}
    )
    assert status == 200
    assert np.array_equal(
        np.array(answer["embeddings"], np.uint8), st_ubinary(vectors_of(front, texts))
    )
