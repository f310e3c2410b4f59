"""`embedd search --rerank MODEL`: the best fused hits reordered by a reranker the daemon
serves. The reranker is the generated XLM-RoBERTa-shaped cross-encoder of
tests/data/rerankers (random weights: its order means nothing about relevance, which is why
each test compares with the scores the daemon's own `rerank` op gives for the same chunks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from embedd_client import Client

from embedd import index
from embedd.index.search import RERANK_DEPTH
from tests.conftest import Daemon, running_daemon

REPO = Path(__file__).resolve().parent.parent
STDLIB_JSON = Path(json.__file__).parent
RERANKER = REPO / "tests" / "data" / "rerankers" / "xlmr-reranker.gguf"
CONFIG = f"""
[models.default]
path = "{{bundled}}"
[models.reranker]
path = "{RERANKER}"
"""
QUERY = "how is a string with escapes decoded"


@pytest.fixture(scope="module")
def served() -> Iterator[Daemon]:
    with running_daemon(CONFIG) as d:
        yield d


@pytest.fixture(scope="module")
def built(served: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Path:
    notes = tmp_path_factory.mktemp("rerank") / "notes"
    notes.mkdir()
    for name in ("decoder.py", "encoder.py", "scanner.py", "tool.py"):
        shutil.copy(STDLIB_JSON / name, notes / name)
    db = notes.parent / "notes.db"
    with Client(served.socket) as client:
        index.index_paths([str(notes)], db, client=client)
    return db


def _cli(served: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedd", "search", *args, "--socket", str(served.socket)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_reranked_hits_are_the_fused_candidates_in_the_rerankers_order(
    served: Daemon, built: Path
) -> None:
    with Client(served.socket) as client:
        fused = index.search(built, QUERY, k=RERANK_DEPTH, client=client)
        hits = index.search(built, QUERY, k=5, client=client, rerank="reranker")
        ranked = client.rerank(QUERY, [h.text for h in fused], "reranker")
    assert [h.text for h in hits] == [fused[r.index].text for r in ranked[:5]]
    assert [h.score for h in hits] == pytest.approx([r.score for r in ranked[:5]], abs=1e-6)


def test_each_reranked_hit_keeps_its_place_and_score_in_the_fused_list(
    served: Daemon, built: Path
) -> None:
    with Client(served.socket) as client:
        fused = index.search(built, QUERY, k=RERANK_DEPTH, client=client)
        hits = index.search(built, QUERY, k=5, client=client, rerank="reranker")
    for h in hits:
        assert h.why is not None and h.why.fused_rank is not None
        before = fused[h.why.fused_rank - 1]
        assert (before.text, before.score) == (h.text, h.why.fused_score)


def test_without_rerank_nothing_is_reranked(served: Daemon, built: Path) -> None:
    with Client(served.socket) as client:
        hits = index.search(built, QUERY, k=5, client=client)
    assert all(h.why is not None and h.why.fused_rank is None for h in hits)


def test_rerank_with_a_model_that_does_not_rerank_names_it(served: Daemon, built: Path) -> None:
    with Client(served.socket) as client, pytest.raises(index.IndexUsageError) as info:
        index.search(built, QUERY, k=5, client=client, rerank="default")
    assert "--rerank default" in str(info.value)


def test_the_cli_explains_where_a_reranked_hit_stood_in_the_fused_list(
    served: Daemon, built: Path
) -> None:
    out = _cli(served, str(built), QUERY, "-k", "3", "--rerank", "reranker", "--explain")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("reranked: #") == 3


def test_the_cli_reranks_keyword_hits_too_and_says_so_in_json(served: Daemon, built: Path) -> None:
    out = _cli(
        served, str(built), "scanstring", "-k", "3", "--mode", "bm25", "--rerank", "reranker",
        "--json", "--explain",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert len(hits) == 3
    assert all(isinstance(h["why"]["fused_rank"], int) for h in hits)
