"""The relevance set and its measurement (tests/relevance.py): the shipped set is well formed
and split in halves, the metrics are what they say, and they are computed for every mode
against the real daemon on a slice of the shipped corpus. The figures themselves are in
docs/search.md, from `python -m tests.relevance`; the whole measurement is a slow test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedd import index
from tests import relevance
from tests.conftest import Daemon

# What the set must hold: 60 or more questions, of each kind in each half.
MIN_QUESTIONS = 60
# The slice of the shipped corpus the default run indexes: small files of a few packages
# (a few thousand tokens, seconds to embed), with the questions they answer.
SLICE = (
    "tmux/README",
    "tmux/NEWS.Debian",
    "tmux/example_tmux.conf",
    "python3-jwt/",
    "libsodium23/README",
    "python3-pip/",
    "openssl/README.Debian",
)


def q(*answers: str | tuple[str, ...]) -> relevance.Question:
    return relevance.Question(
        "?", tuple(frozenset([a]) if isinstance(a, str) else frozenset(a) for a in answers)
    )


def test_the_shipped_set_has_enough_questions_of_every_kind() -> None:
    rset = relevance.load()
    assert len(rset.questions) >= MIN_QUESTIONS
    assert {x.kind for x in rset.questions} == set(relevance.KINDS)


def test_every_kind_of_question_is_in_both_halves() -> None:
    rset = relevance.load()
    for split in relevance.SPLITS:
        assert {x.kind for x in rset.only(split)} == set(relevance.KINDS), split


def test_every_answer_is_a_file_of_the_shipped_corpus() -> None:
    rset = relevance.load()
    assert not rset.missing()
    assert all(x.answers and x.files <= set(rset.files) for x in rset.questions)


def test_the_last_rounds_questions_are_all_held_out() -> None:
    rset = relevance.load()
    last = max(x.round for x in rset.questions)
    fresh = rset.only(round=last)
    assert last > 1 and fresh and {x.split for x in fresh} == {relevance.HELD_OUT}


def test_judged_files_are_files_of_the_corpus_and_never_answers() -> None:
    rset = relevance.load()
    assert any(x.judged for x in rset.questions)
    assert all(x.judged <= set(rset.files) and not x.judged & x.files for x in rset.questions)


def test_the_pool_holds_each_modes_unlabelled_files_down_to_its_depth_once_in_path_order() -> None:
    ranked = {"vector": [["c", "a", "x"]], "bm25": [["b", "c", "y"]]}
    assert relevance.pool(ranked, [q("a")], depth=2) == [["b", "c"]]


def test_the_pool_leaves_out_files_already_judged() -> None:
    judged = relevance.Question("?", (frozenset(["a"]),), judged=frozenset(["b"]))
    assert relevance.pool({"bm25": [["a", "b", "c"]]}, [judged], depth=3) == [["c"]]


def test_hit_at_1_is_whether_the_first_file_answers() -> None:
    scores = relevance.score([["a", "x"], ["x", "b"]], [q("a"), q("b")])
    assert scores.hit1 == 0.5


def test_recall_at_5_counts_answers_among_the_first_five_distinct_files() -> None:
    ranking = relevance.ranked_files(["x", "a", "x", "y", "z", "w", "b"])
    assert relevance.score([ranking], [q("a", "b")]).recall == 0.5  # b is the sixth file


def test_an_answer_is_found_through_any_of_its_copies() -> None:
    copies = ("curl/changelog.Debian", "libcurl4/changelog.Debian")
    scores = relevance.score([["libcurl4/changelog.Debian"]], [q(copies)])
    assert (scores.hit1, scores.recall, scores.mrr) == (1.0, 1.0, 1.0)


def test_mrr_is_one_over_the_rank_of_the_first_answer_within_ten() -> None:
    far = [f"x{i}" for i in range(relevance.RANKED_FILES)] + ["b"]
    scores = relevance.score([["x", "y", "a"], far], [q("a"), q("b")])
    assert scores.mrr == pytest.approx((1 / 3 + 0) / 2)


def test_the_metrics_are_computed_for_every_mode_per_half_and_kind(
    daemon: Daemon, tmp_path: Path
) -> None:
    full = relevance.load()
    files = [f for f in full.files if f.startswith(SLICE)]
    # one question of each half and kind the slice answers
    firsts = {(x.split, x.kind): x for x in reversed(full.questions) if x.files <= set(files)}
    questions = list(firsts.values())
    rset = relevance.RelevanceSet(full.root, files, questions)
    corpus = tmp_path / "corpus"
    relevance.copy_corpus(rset, corpus)
    db = tmp_path / "r.db"
    index.index_paths([corpus], db, socket=daemon.socket)
    ranked = relevance.rankings(rset, db, daemon.socket, k=relevance.RANKED_FILES)
    results = relevance.breakdown(ranked, rset)
    assert {mode for _, _, mode in results} == set(index.MODES)
    assert {(split, kind) for split, kind, _ in results} >= {
        (split, kind) for split in relevance.SPLITS for kind in {x.kind for x in questions}
    }
    assert all(0 <= s.hit1 <= s.mrr <= 1 and 0 <= s.recall <= 1 for s in results.values())


def test_the_pool_is_printed_a_json_line_per_question(
    daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = relevance.load()
    files = [f for f in full.files if f.startswith(SLICE)]
    asked = [x for x in full.questions if x.files <= set(files)][:3]
    small = tmp_path / "small.json"
    small.write_text(json.dumps({
        "root": str(full.root), "files": files,
        "questions": [{"question": x.question, "answers": [sorted(a) for a in x.answers]}
                      for x in asked],
    }))  # fmt: skip
    assert relevance.main(["--set", str(small), "--socket", str(daemon.socket), "--pool", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["question"] for line in lines] == [x.question for x in asked]
    for line, x in zip(lines, asked, strict=True):
        assert len(line["unjudged"]) <= 3 * len(index.MODES)
        assert line["unjudged"] == sorted(line["unjudged"]) and not set(line["unjudged"]) & x.files


@pytest.mark.slow
def test_hybrid_ranks_the_held_out_answers_at_least_as_well_as_either_mode_alone(
    daemon: Daemon, tmp_path: Path
) -> None:
    """The whole measurement (under a minute on two cores). On the held-out half, per kind
    of question, hybrid's MRR@10 is at least the better single mode's, and over the half it
    meets the targets docs/search.md states: hit@1 >= 0.75, recall@5 >= 0.92, MRR@10 >= 0.80."""
    rset = relevance.load()
    corpus = tmp_path / "corpus"
    relevance.copy_corpus(rset, corpus)
    db = tmp_path / "r.db"
    index.index_paths([corpus], db, socket=daemon.socket)
    results = relevance.breakdown(relevance.rankings(rset, db, daemon.socket), rset)
    for kind in ("all", *relevance.KINDS):
        held = {mode: results[(relevance.HELD_OUT, kind, mode)] for mode in index.MODES}
        assert held["hybrid"].mrr >= max(held["vector"].mrr, held["bm25"].mrr), (kind, held)
    whole = results[(relevance.HELD_OUT, "all", "hybrid")]
    assert whole.hit1 >= 0.75 and whole.recall >= 0.92 and whole.mrr >= 0.80, whole
