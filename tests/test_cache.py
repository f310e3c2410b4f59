"""The vector cache, on a daemon of its own with the cache on (the default)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedd.inference.cache import vector_key
from embedd.wire.messages import Embed, Limits, parse_request
from embedd.wire.options import VectorOptions
from tests.conftest import Daemon, cosines, short_tmpdir, start_daemon, vectors

CONFIG = """
[models.default]
path = "{bundled}"
max_tokens = 256
[models.default.prompts]
query = "query: "

# The same file under other names: a longer limit, and another pooling.
[models.twin]
path = "{bundled}"
max_tokens = 512
[models.cls]
path = "{bundled}"
max_tokens = 256
pooling = "cls"
"""


@pytest.fixture(scope="module")
def cached() -> Iterator[Daemon]:
    d = start_daemon(short_tmpdir(), CONFIG)
    yield d
    d.stop()


def _counts(d: Daemon) -> tuple[int, int, int]:
    s = d.call("stats")
    return s["cache"]["hits"], s["cache"]["misses"], s["models"]["default"]["inputs"]


def test_a_repeated_text_is_answered_from_the_cache_with_an_identical_vector(
    cached: Daemon,
) -> None:
    first = cached.call("embed", input="the cache remembers this sentence")
    hits, misses, inputs = _counts(cached)
    again = cached.call("embed", input="the cache remembers this sentence")
    assert _counts(cached) == (hits + 1, misses, inputs)  # a hit; the model saw nothing
    # Exact equality is the point: the second answer is the first one's stored bytes.
    assert np.array_equal(vectors(first), vectors(again))
    assert again["tokens"] == first["tokens"] and again["truncated"] == first["truncated"]


@pytest.mark.parametrize(
    "options",
    [
        {"normalize": False},
        {"dimensions": 128},
        {"prompt": "query"},
        {"truncate": True},
    ],
)
def test_changing_an_option_that_changes_the_vector_misses(
    cached: Daemon, options: dict[str, Any]
) -> None:
    text = f"cache key test {sorted(options)}"
    assert cached.call("embed", input=text)["ok"]
    hits, misses, inputs = _counts(cached)
    assert cached.call("embed", input=text, **options)["ok"]
    assert _counts(cached) == (hits, misses + 1, inputs + 1)


def test_identical_texts_within_one_request_are_computed_once(cached: Daemon) -> None:
    _, _, inputs = _counts(cached)
    r = cached.call("embed", input=["same words", "other words", "same words", "same words"])
    assert _counts(cached)[2] == inputs + 2
    v = vectors(r)
    # Exact: one computed vector copied to each place the text occurs.
    assert np.array_equal(v[0], v[2]) and np.array_equal(v[0], v[3])
    assert r["count"] == 4 and len(r["tokens"]) == 4


def test_a_request_mixing_hits_and_misses_keeps_the_input_order(cached: Daemon) -> None:
    a = vectors(cached.call("embed", input="order alpha"))[0]
    mixed = cached.call("embed", input=["order beta", "order alpha", "order gamma"])
    b = vectors(cached.call("embed", input="order beta"))[0]
    v = vectors(mixed)
    # Exact: each vector here was computed once and the other copy served from the cache.
    assert np.array_equal(v[1], a)
    assert np.array_equal(v[0], b)


def test_the_cache_is_bounded_in_bytes(workdir: Path, own_daemon: list[Daemon]) -> None:
    d = start_daemon(workdir, "cache_bytes = 20000\n")
    own_daemon.append(d)
    d.call("embed", input=[f"sentence number {i}" for i in range(40)])
    stats = d.call("stats")["cache"]
    assert stats["bytes"] <= 20000
    assert stats["evictions"] > 0
    assert 0 < stats["entries"] < 40


def test_errors_name_the_clients_index_even_when_texts_repeat(cached: Daemon) -> None:
    long_text = "word " * 300
    r = cached.call("embed", input=["cached ok", "cached ok", long_text])
    assert r["error"]["code"] == "input_too_long"
    assert r["error"]["index"] == 2


def test_cache_false_neither_reads_nor_fills_the_cache(cached: Daemon) -> None:
    text = "computed every time on request"
    cached.call("embed", input=text)
    hits, misses, inputs = _counts(cached)
    assert cached.call("embed", input=text, cache=False)["ok"]
    assert _counts(cached) == (hits, misses, inputs + 1)


def test_a_model_with_a_longer_limit_on_the_same_file_does_not_fill_the_others_cache(
    cached: Daemon,
) -> None:
    text = "a sentence that grows long " * 60  # ~300 tokens: over 256, under 512
    assert cached.call("embed", input=text)["error"]["code"] == "input_too_long"
    assert cached.call("embed", model="twin", input=text)["truncated"] == [False]
    again = cached.call("embed", input=text)
    assert again["ok"] is False and again["error"]["code"] == "input_too_long"


def test_a_model_with_other_pooling_on_the_same_file_gets_its_own_vectors(
    cached: Daemon,
) -> None:
    text = "pooling changes what a vector means"
    mean = vectors(cached.call("embed", input=text))[0]
    cls = vectors(cached.call("embed", model="cls", input=text))[0]
    fresh_cls = vectors(cached.call("embed", model="cls", input=text, cache=False))[0]
    assert cosines(cls[None, :], fresh_cls[None, :])[0] >= 0.99999  # two separate decodes
    assert float(np.dot(mean, cls)) < 0.99


def test_vectors_from_another_tokenizer_are_other_entries() -> None:
    """A tokenizer fix changes ids, hence vectors: the old tokenizer's are never served."""

    @dataclass(frozen=True)
    class Model:
        fingerprint: str = "f00d"
        max_tokens: int = 256
        pooling: str = "mean"
        tokenizer: str = "llama.cpp-0.3.36"

    def key(model: Model) -> object:
        return vector_key(model, "한국어", VectorOptions())

    assert key(Model()) != key(Model(tokenizer="wordpiece-hf-1"))
    assert key(Model()) == key(Model())


def _options(**args: Any) -> VectorOptions:
    request = parse_request({"id": 1, "op": "embed", "input": "a", **args}, Limits())
    assert isinstance(request.args, Embed)
    return request.args.options


def test_two_ways_of_asking_for_one_vector_are_one_set_of_options() -> None:
    assert _options(truncate=True) == _options(long="truncate") == VectorOptions(long="truncate")
    assert _options(long="split", overlap=4) != _options(long="split")
    assert _options(long="split", pool="none") != _options(long="split")
    assert _options(prompt="query") != _options()


def test_the_cache_key_holds_the_prompts_text_not_its_name() -> None:
    @dataclass(frozen=True)
    class Model:
        fingerprint: str = "f00d"
        max_tokens: int = 256
        pooling: str = "mean"
        tokenizer: str = "wordpiece-hf-1"

    named = vector_key(Model(), "query: a", _options(prompt="query"))
    assert named == vector_key(Model(), "query: a", _options())
    assert named != vector_key(Model(), "query: a", _options(truncate=True))
