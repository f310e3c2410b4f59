"""Apps switch to embedd by changing a base URL: the real libraries, installed from the
registry, ingest long chunks through the HTTP front unchanged: an app switches by a base URL.

Each library is used as its documentation shows, with only the base URL, the key and a model
name changed. Their chunkers make chunks longer than the bundled model's 256 tokens; the HTTP
front splits those by default (`http_long = "split"`), so each gets the mean of its windows,
the same vector the msgpack socket gives with `long="split"`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import (
    Daemon,
    Reference,
    cosines,
    free_port,
    short_tmpdir,
    start_daemon,
    vectors,
)

# What Chroma's OpenAIEmbeddingFunction and LlamaIndex's OpenAIEmbedding send by default: the
# docs/models.md shows this alias as the user's explicit choice.
OPENAI_DEFAULT = "text-embedding-ada-002"


@dataclass(frozen=True)
class Front:
    daemon: Daemon
    port: int
    key: str

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def split_vectors(self, texts: list[str]) -> np.ndarray[Any, Any]:
        """What the msgpack socket gives for the same texts, split as the HTTP front does."""
        return vectors(self.daemon.call("embed", input=texts, long="split"))


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    workdir = short_tmpdir()
    port = free_port()
    d = start_daemon(
        workdir,
        '[models.default]\npath = "{bundled}"\nmax_tokens = 256\n'
        f'aliases = ["{OPENAI_DEFAULT}", "all-minilm"]\n',
        extra_args=("--http", f"127.0.0.1:{port}", "--api-key-file", str(workdir / "key")),
    )
    yield Front(d, port, (workdir / "key").read_text().strip())
    d.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def document() -> str:
    """A real document: this project's PROTOCOL.md (~20 KB of prose, tables and code, which
    WordPiece cuts finely: many of its 1,000-character chunks exceed 256 tokens)."""
    return (Path(__file__).parent.parent / "PROTOCOL.md").read_text()


def _too_long(front: Front, texts: list[str]) -> int:
    counts = front.daemon.call("tokenize", input=texts)["counts"]
    return sum(1 for n in counts if n > 256)


def test_langchain_ingests_1000_character_chunks_unchanged(front: Front, document: str) -> None:
    from langchain_openai import OpenAIEmbeddings
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    chunks = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=100).split_text(document)
    assert _too_long(front, chunks) > 0  # the case that failed: chunks over the model's limit
    embeddings = OpenAIEmbeddings(
        model="default",
        base_url=front.base_url,
        api_key=front.key,  # type: ignore[arg-type]
        check_embedding_ctx_length=False,
    )
    got = np.asarray(embeddings.embed_documents(chunks), dtype=np.float32)
    assert cosines(got, front.split_vectors(chunks)).min() >= 0.9999


def test_llamaindex_from_documents_with_defaults_ingests_and_retrieves(
    front: Front, document: str
) -> None:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.embeddings.openai import OpenAIEmbedding  # type: ignore[import-untyped]

    Settings.embed_model = OpenAIEmbedding(
        model_name=OPENAI_DEFAULT, api_base=front.base_url, api_key=front.key
    )
    index = VectorStoreIndex.from_documents([Document(text=document)])
    # A passage from the middle of a node (away from the overlaps with its neighbours) finds
    # that node.
    made = sorted(index.docstore.docs.values(), key=lambda n: n.node_id)
    assert len(made) > 2
    node = made[len(made) // 2]
    text = node.get_content()
    passage = text[len(text) // 2 - 150 : len(text) // 2 + 150]
    found = index.as_retriever(similarity_top_k=1).retrieve(passage)
    assert found and found[0].node.node_id == node.node_id


def test_chroma_with_openais_embedding_function_adds_and_queries_long_chunks(
    front: Front, reference: Reference
) -> None:
    import chromadb
    from chromadb.config import Settings as ChromaSettings
    from chromadb.utils.embedding_functions import OpenAIEmbeddingFunction

    docs = reference.chunks_long[:20]
    assert _too_long(front, docs) > 0
    function = OpenAIEmbeddingFunction(
        api_key=front.key, api_base=front.base_url, model_name=OPENAI_DEFAULT
    )
    client = chromadb.EphemeralClient(settings=ChromaSettings(anonymized_telemetry=False))
    collection = client.create_collection("docs", embedding_function=function)  # type: ignore[arg-type]
    collection.add(ids=[str(i) for i in range(len(docs))], documents=docs)
    found = collection.query(query_texts=[docs[7]], n_results=1)
    assert found["ids"] == [["7"]]


def test_ollama_python_sends_the_key_from_ollama_api_key(front: Front, document: str) -> None:
    # A fresh process: the client reads OLLAMA_HOST and OLLAMA_API_KEY when it is created.
    script = (
        "import json, ollama\n"
        "r = ollama.Client().embed(model='all-minilm:latest', input=[open(0).read()])\n"
        "print(json.dumps(r['embeddings']))\n"
    )
    env = {"OLLAMA_HOST": f"http://127.0.0.1:{front.port}", "OLLAMA_API_KEY": front.key}
    out = subprocess.run(
        [sys.executable, "-c", script],
        input=document[:3000],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert out.returncode == 0, out.stderr
    got = np.asarray(json.loads(out.stdout), dtype=np.float32)
    assert cosines(got, front.split_vectors([document[:3000]])).min() >= 0.9999
