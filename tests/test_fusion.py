"""Fusion of ranked lists into passages (embedd/index/fusion.py), rule by rule, without a
daemon: ranked lists with scores in, fused hits out."""

from __future__ import annotations

from embedd.index import fusion
from embedd.index.fusion import BM25, VECTOR, Chunk, Key

# Filler lists: chunks of unrelated files with scores that fall gently, as a real list's tail
# does, so that a clear first place stands out of them.
TAIL = 30


def tail(name: str, top: float, step: float) -> list[tuple[Key, float]]:
    return [((f"{name}-{i}.txt", 0), top - step * i) for i in range(TAIL)]


def text(*words: str) -> str:
    """A chunk text of distinct words: no two such texts share a shingle."""
    return " ".join(words)


def words(prefix: str, n: int = 40) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_a_single_first_place_in_bm25_beats_two_middling_places() -> None:
    single = ("cve.txt", 0)
    middling = ("look-alike.txt", 0)
    vector = [*tail("v", 0.50, 0.002)[:5], (middling, 0.49), *tail("w", 0.48, 0.002)]
    bm25 = [(single, 30.0), *tail("b", 9.0, 0.05)[:5], (middling, 8.7), *tail("c", 8.6, 0.05)]
    fused = fusion.fuse({VECTOR: vector, BM25: bm25}, {})
    assert fused[0].key == single


def test_a_flat_list_gives_no_more_to_its_first_place_than_its_spread_says() -> None:
    flat = fusion.normalised([0.401, 0.400, 0.399, 0.398])
    clear = fusion.normalised([0.9, 0.4, 0.39, 0.38])
    assert clear[0] > flat[0]


def test_a_list_of_one_gives_its_chunk_a_full_vote() -> None:
    assert fusion.normalised([3.0]) == [1.0]


def test_chunks_a_list_leaves_out_as_scoring_zero_make_the_few_it_names_stand_out() -> None:
    alone = fusion.normalised([4.6, 4.6])
    among_zeros = fusion.normalised([4.6, 4.6], unlisted=198)
    assert alone == [0.0, 0.0] and min(among_zeros) > 5


def test_the_few_chunks_holding_a_rare_identifier_win_over_vectors_look_alikes() -> None:
    # BM25 names only the two chunks that hold the identifier, with equal scores; the
    # vectors rank a look-alike first. The rest of the index holds none of its words.
    holders = [(("debian/changelog", 7), 4.6), (("debian/changelog", 20), 4.6)]
    look_alike = ("upstream/changelog", 3)
    vector = [(look_alike, 0.69), (holders[0][0], 0.67), *tail("v", 0.6, 0.002)]
    weights = fusion.weights_for("ZSTD_LEGACY_MULTITHREADED_API")
    fused = fusion.fuse({VECTOR: vector, BM25: holders}, {}, weights=weights)
    assert fused[0].key in {key for key, _ in holders}


def test_only_a_keyword_list_counts_what_it_leaves_out_as_zero() -> None:
    # A cosine list shorter than the BM25 list names every chunk there is: nothing unlisted.
    few = [(("a.txt", 0), 0.5), (("b.txt", 0), 0.5)]
    many = tail("b", 9.0, 0.05)
    norms, _, _ = fusion._votes({VECTOR: few, BM25: many}, fusion.WEIGHTS)
    assert [vote for _, _, vote in norms[VECTOR].values()] == [0.0, 0.0]


def test_adjacent_chunks_of_one_file_vote_together() -> None:
    """Vectors rank chunk 1 of the answer first, BM25 its chunk 2: together they beat a
    chunk that both lists rank second, which each answer chunk alone would not."""
    answer_1, answer_2 = ("answer.txt", 1), ("answer.txt", 2)
    second = ("mention.txt", 0)
    vector = [(answer_1, 0.60), (second, 0.50), *tail("v", 0.40, 0.002)]
    bm25 = [(answer_2, 12.0), (second, 10.0), *tail("b", 5.0, 0.05)]
    chunks = {answer_1: Chunk(words("a"), 3), answer_2: Chunk(words("b"), 3)}
    fused = fusion.fuse({VECTOR: vector, BM25: bm25}, chunks)
    assert fused[0].key[0] == "answer.txt"
    assert [f.key[0] for f in fused].count("answer.txt") == 1


def test_a_chunk_next_to_a_better_hit_of_its_file_is_folded_into_it() -> None:
    first, second = ("notes.txt", 4), ("notes.txt", 5)
    ranking = [(first, 0.9), (second, 0.8), *tail("v", 0.5, 0.002)]
    chunks = {first: Chunk(words("x"), 9), second: Chunk(words("y"), 9)}
    fused = fusion.fuse({VECTOR: ranking}, chunks)
    assert fused[0].key == first
    assert fused[0].adjacent == (second,)
    assert second not in [f.key for f in fused]


def test_chunks_far_apart_in_one_file_stay_separate_hits() -> None:
    first, far = ("notes.txt", 1), ("notes.txt", 7)
    ranking = [(first, 0.9), (far, 0.8), *tail("v", 0.5, 0.002)]
    chunks = {first: Chunk(words("x"), 9), far: Chunk(words("y"), 9)}
    assert [f.key for f in fusion.fuse({VECTOR: ranking}, chunks)][:2] == [first, far]


def test_near_duplicates_fold_into_one_hit_with_a_count() -> None:
    paragraph = words("release", 60)
    copies = [("curl/changelog", 0), ("libcurl4/changelog", 0), ("libcurl3/changelog", 0)]
    ranking = [(k, 0.8) for k in copies] + tail("v", 0.5, 0.002)
    chunks = {k: Chunk(paragraph, 5) for k in copies}
    fused = fusion.fuse({VECTOR: ranking}, chunks)
    assert fused[0].key in copies
    assert len(fused[0].similar) == 2
    assert all(f.key not in copies for f in fused[1:])


def test_a_copy_with_a_changed_line_is_still_a_near_duplicate() -> None:
    base = words("w", 60)
    edited = base.replace("w59", "apt changelog libexpat1-dev")
    groups = fusion.near_duplicates({("a", 0): base, ("b", 0): edited})
    assert len(groups) == 1


def test_chunks_sharing_a_phrase_but_not_their_text_stay_apart() -> None:
    shared = " ".join(f"common{i}" for i in range(10))
    a = shared + " " + words("a", 50)
    b = shared + " " + words("b", 50)
    assert len(fusion.near_duplicates({("a", 0): a, ("b", 0): b})) == 2


def test_near_duplicates_fold_into_the_most_specific_copy() -> None:
    """Equal votes: shown at the copy from the file with the fewest chunks (the document
    itself rather than a long file that holds it)."""
    paragraph = words("licence", 60)
    quoted, itself = ("big/copyright", 3), ("licenses/BSD", 0)
    ranking = [(quoted, 0.8), (itself, 0.8), *tail("v", 0.5, 0.002)]
    chunks = {quoted: Chunk(paragraph, 12), itself: Chunk(paragraph, 1)}
    fused = fusion.fuse({VECTOR: ranking}, chunks)
    assert fused[0].key == itself
    assert fused[0].similar == (quoted,)


def test_a_folded_hit_takes_each_lists_best_vote_among_its_copies() -> None:
    paragraph = words("notice", 60)
    a, b = ("a/NEWS", 0), ("b/NEWS", 0)
    vector = [(a, 0.9), *tail("v", 0.5, 0.002)]
    bm25 = [(b, 20.0), *tail("b", 5.0, 0.05)]
    chunks = {a: Chunk(paragraph, 2), b: Chunk(paragraph, 2)}
    fused = fusion.fuse({VECTOR: vector, BM25: bm25}, chunks)
    assert set(fused[0].votes) == {VECTOR, BM25}
    assert fused[0].votes[VECTOR].rank == 1 and fused[0].votes[BM25].rank == 1


def test_boilerplate_quoted_across_many_files_is_down_weighted() -> None:
    licence = words("permission", 40)
    quoting = {(f"pkg{i}/copyright", 0): licence + " " + words(f"pkg{i}x", 20) for i in range(5)}
    specific = ("pkg9/README", 0)
    texts = {**quoting, specific: words("readme", 60)}
    shares = fusion.boilerplate_shares(texts, {k: 3 for k in texts})
    assert all(shares[k] > 0 for k in list(quoting)[1:])
    assert shares[specific] == 0


def test_the_licence_itself_is_not_boilerplate_of_the_files_quoting_it() -> None:
    licence_text = words("permission", 40)
    itself = ("common-licenses/BSD", 0)
    texts = {itself: licence_text}
    texts |= {(f"pkg{i}/copyright", 0): licence_text + " " + words(f"p{i}x", 20) for i in range(5)}
    sizes = {k: 1 if k == itself else 4 for k in texts}
    shares = fusion.boilerplate_shares(texts, sizes)
    assert shares[itself] == 0
    assert shares[("pkg0/copyright", 0)] > 0


def test_a_little_boilerplate_in_real_text_is_not_held_against_it() -> None:
    line = words("seechangelog", 4)
    texts = {(f"pkg{i}/NEWS", 0): line + " " + words(f"n{i}x", 60) for i in range(6)}
    shares = fusion.boilerplate_shares(texts, {k: 3 for k in texts})
    assert all(share == 0 for share in shares.values())


def test_a_query_of_identifiers_leans_on_bm25() -> None:
    weights = fusion.weights_for("CVE-2024-45491")
    assert weights[VECTOR] < weights[BM25]


def test_a_question_in_words_leans_on_vectors() -> None:
    weights = fusion.weights_for("who maintains the port for the other operating system")
    assert weights[VECTOR] > weights[BM25]


def test_flags_file_names_and_camel_case_count_as_identifiers() -> None:
    for word in ("--break-system-packages", "msvcc.sh", "doContent", "HSTS", "x509_extensions"):
        assert fusion.identifier_share(word) == 1.0, word
    assert fusion.identifier_share("renew the certificate") == 0.0


def test_every_hit_says_its_rank_and_score_in_each_list_that_ranked_it() -> None:
    a, b = ("a.txt", 0), ("b.txt", 0)
    vector = [(a, 0.7), (b, 0.6), *tail("v", 0.4, 0.002)]
    bm25 = [(b, 9.0), *tail("b", 3.0, 0.05)]
    fused = {f.key: f for f in fusion.fuse({VECTOR: vector, BM25: bm25}, {})}
    assert fused[a].votes[VECTOR].rank == 1 and fused[a].votes[VECTOR].score == 0.7
    assert BM25 not in fused[a].votes
    assert fused[b].votes[BM25].rank == 1 and fused[b].votes[VECTOR].rank == 2


def test_candidates_past_the_limit_are_not_fused() -> None:
    ranking = [((f"f{i}", 0), 1.0 - i * 1e-5) for i in range(fusion.MAX_CANDIDATES + 50)]
    assert len(fusion.fuse({VECTOR: ranking}, {})) == fusion.MAX_CANDIDATES


def test_shingles_per_chunk_are_bounded() -> None:
    assert len(fusion.shingles(words("w", fusion.MAX_SHINGLES * 2))) == fusion.MAX_SHINGLES


def test_only_the_best_candidates_are_compared_as_text() -> None:
    """Copies ranked below the first COMPARED candidates are left alone: the text work of a
    query is bounded, and they could not reach a page of results anyway."""
    paragraph = words("copy", 60)
    ahead = [((f"top{i}", 0), 1.0 - i * 1e-4) for i in range(fusion.COMPARED)]
    low = [(("a/NEWS", 0), 0.1), (("b/NEWS", 0), 0.1)]
    chunks = {key: Chunk(paragraph) for key, _ in low}
    fused = fusion.fuse({VECTOR: ahead + low}, chunks)
    assert [f.key for f in fused][-2:] == [key for key, _ in low]


def test_a_limited_fusion_is_the_first_hits_of_the_whole_one() -> None:
    """Hits past the limit are left out, but a chunk next to one of them still folds into it
    rather than into a hit on the page (as without the limit)."""
    ranking = [((f"f{i % 7}", i // 7), 1.0 - i * 0.01) for i in range(60)]
    whole = fusion.fuse({VECTOR: ranking}, {})
    limited = fusion.fuse({VECTOR: ranking}, {}, limit=3)
    assert [(f.key, f.adjacent, f.score) for f in limited] == [
        (f.key, f.adjacent, f.score) for f in whole[:3]
    ]


def test_only_the_compared_candidates_texts_are_read() -> None:
    """`compared` names the chunks whose texts fuse reads: copies among them fold, and a
    text given for any other chunk changes nothing."""
    paragraph = words("copy", 60)
    ranking = [((f"top{i}", 0), 1.0 - i * 1e-3) for i in range(fusion.COMPARED + 20)]
    read = fusion.compared({VECTOR: ranking})
    assert read == [key for key, _ in ranking[: fusion.COMPARED]]
    chunks = {key: Chunk(paragraph) for key, _ in ranking[fusion.COMPARED - 2 :]}
    fused = {f.key: f for f in fusion.fuse({VECTOR: ranking}, chunks)}
    last_two = [key for key, _ in ranking[fusion.COMPARED - 2 : fusion.COMPARED]]
    assert fused[last_two[0]].similar == (last_two[1],)
    assert len(fused) == len(ranking) - 1
