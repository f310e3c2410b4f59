"""Models other than the bundled one, generated at test time (tests/gguf_models.py): a BERT with
CLS pooling. Each loads through the daemon, reports its card, gives llama-cpp-python's own
in-process vectors, the same vector alone and packed with others, and keeps its special frame
when truncated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedd.engine import Engine
from tests.conftest import Daemon, cosines, short_tmpdir, start_daemon, vectors
from tests.gguf_models import write_bert

TEXTS = ["hello world", "a second, longer sentence about embeddings", "short", "x y z " * 20]


@pytest.fixture(scope="module")
def cls_model() -> Iterator[Path]:
    directory = short_tmpdir()
    yield write_bert(directory / "tiny-cls.gguf", pooling=2)


@pytest.fixture(scope="module")
def served(cls_model: Path) -> Iterator[Daemon]:
    d = start_daemon(short_tmpdir(), f'[models.cls]\npath = "{cls_model}"\nmax_tokens = 64\n')
    yield d
    d.stop()


def test_a_cls_pooled_bert_loads_and_reports_its_card(served: Daemon) -> None:
    served.call("load", model="cls")
    card = {m["name"]: m for m in served.call("models")["models"]}["cls"]
    assert (card["architecture"], card["pooling"], card["causal"]) == ("bert", "cls", False)
    assert card["dim"] == 32 and card["model_name"] == "tiny bert pooling 2"


def test_its_vectors_equal_llama_cpp_pythons_in_process(served: Daemon, cls_model: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(cls_model), embedding=True, n_ctx=512, n_batch=512,
                n_ubatch=512, verbose=False)  # fmt: skip
    try:
        expected = np.asarray([llm.embed(t, normalize=True) for t in TEXTS], dtype=np.float32)
    finally:
        llm.close()
    got = vectors(served.call("embed", model="cls", input=TEXTS))
    assert cosines(got, expected).min() >= 0.9999


def test_each_input_gives_the_same_vector_alone_and_packed_with_others(served: Daemon) -> None:
    packed = vectors(served.call("embed", model="cls", input=TEXTS))
    for i, text in enumerate(TEXTS):
        alone = vectors(served.call("embed", model="cls", input=[text]))
        assert cosines(alone, packed[i : i + 1])[0] >= 0.99999


def test_truncation_keeps_the_models_special_frame(cls_model: Path) -> None:
    engine = Engine(cls_model, threads=1, batch_tokens=64, max_tokens=64, pooling=None)
    try:
        ids, cut = engine.tokenize("word " * 200, truncate_to=16)
        full, _ = engine.tokenize("hello")
    finally:
        engine.close()
    assert cut and len(ids) == 16
    assert (ids[0], ids[-1]) == (full[0], full[-1]) == (101, 102)  # [CLS] ... [SEP]


def test_tokenize_counts_what_the_model_sees(served: Daemon) -> None:
    counts = served.call("tokenize", model="cls", input=TEXTS)["counts"]
    tokens = served.call("embed", model="cls", input=TEXTS)["tokens"]
    assert counts == tokens
