"""Models other than the bundled one, generated at test time (tests/gguf_models.py): BERT
with CLS pooling, nomic-bert (rotary), jina-bert-v2 (ALiBi), gemma-embedding (sliding window,
dense projections, a SentencePiece vocabulary) and a causal Qwen3 with last-token pooling and
EOS appended (as Qwen3-Embedding). Each loads through the daemon, reports its card, gives
llama-cpp-python's own in-process vectors, the same vector alone and packed with others, and
keeps its special frame when truncated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedd.inference.engine import Model
from tests.conftest import Daemon, cosines, short_tmpdir, start_daemon, vectors
from tests.gguf_models import write_bert, write_gemma_embedding, write_qwen3

TEXTS = ["hello world", "a second, longer sentence about embeddings", "short", "x y z " * 20]


@pytest.fixture(scope="module")
def cls_model() -> Iterator[Path]:
    directory = short_tmpdir()
    yield write_bert(directory / "tiny-cls.gguf", pooling=2)


@pytest.fixture(scope="module")
def qwen3_model() -> Iterator[Path]:
    yield write_qwen3(short_tmpdir() / "tiny-qwen3.gguf")


@pytest.fixture(scope="module")
def files(cls_model: Path, qwen3_model: Path) -> dict[str, Path]:
    directory = cls_model.parent
    return {
        "cls": cls_model,
        "qwen3": qwen3_model,
        "nomic": write_bert(directory / "tiny-nomic.gguf", pooling=1, arch="nomic-bert"),
        "jina": write_bert(directory / "tiny-jina.gguf", pooling=1, arch="jina-bert-v2"),
        "gemma": write_gemma_embedding(directory / "tiny-gemma.gguf"),
    }


@pytest.fixture(scope="module")
def served(files: dict[str, Path]) -> Iterator[Daemon]:
    config = "".join(
        f'[models.{name}]\npath = "{path}"\nmax_tokens = {256 if name == "qwen3" else 64}\n'
        for name, path in files.items()
    )
    d = start_daemon(short_tmpdir(), config)
    yield d
    d.stop()


MODELS = {
    "cls": ("bert", "cls", False),
    "qwen3": ("qwen3", "last", True),
    "nomic": ("nomic-bert", "mean", False),
    "jina": ("jina-bert-v2", "mean", False),
    "gemma": ("gemma-embedding", "mean", False),
}


@pytest.mark.parametrize("name", MODELS)
def test_it_loads_and_reports_its_card(served: Daemon, name: str) -> None:
    served.call("load", model=name)
    card = {m["name"]: m for m in served.call("models")["models"]}[name]
    assert (card["architecture"], card["pooling"], card["causal"]) == MODELS[name]
    assert card["dim"] == 32 and card["model_name"].startswith("tiny ")


@pytest.mark.parametrize("name", MODELS)
def test_its_vectors_equal_llama_cpp_pythons_in_process(
    served: Daemon, files: dict[str, Path], name: str
) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=str(files[name]), embedding=True, n_ctx=512,
                n_batch=512, n_ubatch=512, verbose=False)  # fmt: skip
    try:
        expected = np.asarray([llm.embed(t, normalize=True) for t in TEXTS], dtype=np.float32)
    finally:
        llm.close()
    got = vectors(served.call("embed", model=name, input=TEXTS))
    assert cosines(got, expected).min() >= 0.9999


@pytest.mark.parametrize("name", MODELS)
def test_each_input_gives_the_same_vector_alone_and_packed_with_others(
    served: Daemon, name: str
) -> None:
    """For the causal model too: packed sequences never see each other's tokens."""
    packed = vectors(served.call("embed", model=name, input=TEXTS))
    for i, text in enumerate(TEXTS):
        alone = vectors(served.call("embed", model=name, input=[text]))
        assert cosines(alone, packed[i : i + 1])[0] >= 0.99999


def test_truncation_keeps_the_models_special_frame(cls_model: Path) -> None:
    engine = Model(cls_model, batch_tokens=64, max_tokens=64)
    try:
        ids, cut = engine.tokenize("word " * 200, truncate_to=16)
        full, _ = engine.tokenize("hello")
    finally:
        engine.close()
    assert cut and len(ids) == 16
    assert (ids[0], ids[-1]) == (full[0], full[-1]) == (101, 102)  # [CLS] ... [SEP]


def test_truncation_keeps_the_eos_a_last_token_model_pools_on(qwen3_model: Path) -> None:
    engine = Model(qwen3_model, batch_tokens=64, max_tokens=64)
    try:
        ids, cut = engine.tokenize("hello world " * 50, truncate_to=16)
        full, _ = engine.tokenize("hello")
    finally:
        engine.close()
    assert cut and len(ids) == 16
    assert ids[-1] == full[-1] == 266  # <|endoftext|>, appended as Qwen3-Embedding expects


def test_a_qwen2_vocabulary_composes_text_to_nfc_as_its_reference_does(qwen3_model: Path) -> None:
    """Qwen2/Qwen3's tokenizer.json normalizes to NFC; llama.cpp does not."""
    engine = Model(qwen3_model, batch_tokens=64, max_tokens=64)
    try:
        decomposed, _ = engine.tokenize("cafe\u0301 \u0b9a\u0bc6\u0bbe")
        composed, _ = engine.tokenize("caf\u00e9 \u0b9a\u0bca")
        assert engine.card["tokenizer"].endswith("+nfc")
    finally:
        engine.close()
    assert decomposed == composed


@pytest.mark.parametrize("name", MODELS)
def test_tokenize_counts_what_the_model_sees(served: Daemon, name: str) -> None:
    counts = served.call("tokenize", model=name, input=TEXTS)["counts"]
    tokens = served.call("embed", model=name, input=TEXTS)["tokens"]
    assert counts == tokens


def test_a_sentencepiece_model_keeps_its_bos_and_eos_when_truncated(files: dict[str, Path]) -> None:
    engine = Model(files["gemma"], batch_tokens=64, max_tokens=64)
    try:
        ids, cut = engine.tokenize("hello world " * 50, truncate_to=16)
    finally:
        engine.close()
    assert cut and len(ids) == 16 and (ids[0], ids[-1]) == (2, 1)  # <bos> ... <eos>
