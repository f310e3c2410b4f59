"""embedd's WordPiece tokenizer (embedd/inference/tokenizer.py) gives the reference's ids.

The reference is Hugging Face's `tokenizers` (what sentence-transformers runs), rebuilt here
from the bundled GGUF's own vocabulary: BertNormalizer (clean text, CJK spacing, strip accents,
lower-case), BertPreTokenizer and WordPiece, with the five special tokens as non-normalized
added tokens, which is how the model's tokenizer.json declares them. Tests that need it skip
without it; `tests/data/tokenizer_reference.json` holds ids it gave for one text per behaviour
(the script classes below), so the regression check also runs without it. Regenerate that
file with `python -m tests.test_tokenizer` (needs `tokenizers`) only when the reference itself
changes.
"""

from __future__ import annotations

import ast
import json
import random
import sys
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from embedd.inference import tokenizer as tokenizer_module
from embedd.inference.tokenizer import (
    WordPieceConfig,
    WordPieceTokenizer,
    vocabulary_from_gguf,
)
from tests.conftest import BUNDLED, DATA, cosines

REFERENCE_IDS = DATA / "tokenizer_reference.json"
CLS, SEP, UNK = 101, 102, 100
# The bundled model's limit (max_seq_length 256, see embedd/bundled/PROVENANCE.md).
MAX_TOKENS = 256
# faker locales per script; a locale this faker lacks is skipped.
LOCALES = [
    "en_US", "fr_FR", "de_DE", "pl_PL", "cs_CZ", "vi_VN", "tr_TR", "ru_RU", "uk_UA", "el_GR",
    "ar_AA", "fa_IR", "he_IL", "hi_IN", "bn_BD", "ta_IN", "th_TH", "zh_CN", "ja_JP", "ko_KR",
    "hy_AM", "ka_GE",
]  # fmt: skip
# Generated texts per locale: a few in the default run, many more in the slow one.
TEXTS_PER_LOCALE = 8
TEXTS_PER_LOCALE_SLOW = 400

# One or more texts per class of difference found between llama.cpp and the reference.
EDGE_CASES: dict[str, list[str]] = {
    "hangul_syllables": ["한국어", "대한민국의 수도는 서울입니다.", "가각갂 힣"],
    "spacing_marks": [
        "नमस्ते दुनिया, यह हिन्दी है",
        "বাংলা ভাষা আমার",
        "தமிழ் மொழி இனிமை",
        "keycaps 1\u20e3 #\u20e3",
    ],
    "vt_ff_nel": ["a\x0bb c\x0cd e\x85f", "\x0b\x0c\x85", "tab\tnew\nline\rreturn"],
    "long_words": ["a" * 100, "a" * 101, "x" * 3000 + " tail", "\u00e9" * 101, "ab" * 60],
    "literal_specials": [
        "[CLS]",
        "a[SEP]b",
        "[MASK] is [UNK] and [PAD]",
        "[cls] [Sep] stay text",
        "[[CLS]] [CLS[SEP]]",
    ],
    "u2581": ["a\u2581b", "\u2581start", "\u2581\u2581 \u2581"],
    "rare_code_points": [
        "\u0890\u08ca \U00011fff \u166d \u111c9 \u1734",
        "\ue000 private \U000ffffe noncharacter \U0010fffd",
        "zero\u200bwidth \ufeffbom \ufffd \x00 nul",
        "emoji \U0001f600\U0001f469\u200d\U0001f4bb",
    ],
    "case_and_accents": [
        "\u03a3\u039f\u03a6\u0399\u0391 \u039f\u0394\u039f\u03a3",  # final capital sigma
        "\u0130stanbul",
        "Cr\u00e8me Br\u00fbl\u00e9e \u01c4 \uff21\uff22\uff23",
        "e\u0301\u0302\u0303 \u1e9e",
    ],
    "cjk_and_punctuation": [
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \uf900 \U0002f800",
        "\u00bfQu\u00e9? \u00a1S\u00ed! don't e-mail a.b_c",
        "\u201cquoted\u201d \u2014 dash \u3002\uff01",
    ],
}


# --- the reference and the vocabulary ---------------------------------------------------------


@cache
def bundled_vocabulary() -> tuple[str, ...]:
    """The bundled model's vocab.txt strings, read from its GGUF."""
    reader = gguf.GGUFReader(BUNDLED)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    literal = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    return tuple(vocabulary_from_gguf(tokens, literal))


@cache
def bundled_tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer(bundled_vocabulary())


@cache
def reference_tokenizer() -> Any:
    """Hugging Face's tokenizer (`tokenizers.Tokenizer`) over the bundled vocabulary."""
    tk = pytest.importorskip("tokenizers")
    vocab = bundled_vocabulary()
    model = tk.models.WordPiece(
        {t: i for i, t in reversed(list(enumerate(vocab)))},
        unk_token="[UNK]",
        max_input_chars_per_word=100,
    )
    ref = tk.Tokenizer(model)
    ref.normalizer = tk.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    ref.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    ref.add_special_tokens(
        [
            tk.AddedToken(t, special=True, normalized=False)
            for t in tokenizer_module.BERT_SPECIAL_TOKENS
        ]
    )
    return ref


@cache
def oracle() -> Callable[[list[str]], list[list[int]]]:
    """The reference tokenizer over the bundled vocabulary: texts -> bare ids."""
    ref = reference_tokenizer()

    def encode(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]

    return encode


def locale_texts(locale: str, n: int, seed: int = 17) -> list[str]:
    """`n` texts in a locale's script: names, addresses, jobs and running text (several
    locales' running text is Latin lorem ipsum; their names and addresses are not)."""
    faker = pytest.importorskip("faker")
    if locale not in faker.config.AVAILABLE_LOCALES:
        pytest.skip(f"faker has no {locale}")
    fake = faker.Faker(locale)
    fake.seed_instance(seed)
    return [
        " ".join(
            [fake.name(), fake.address(), fake.city(), fake.company(), fake.job(), fake.text(200)]
        )
        for _ in range(n)
    ]


def reference_cases() -> dict[str, list[dict[str, Any]]]:
    cases: dict[str, list[dict[str, Any]]] = json.loads(REFERENCE_IDS.read_text())["classes"]
    return cases


# --- pure: small hand-made vocabularies -------------------------------------------------------

SMALL_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "un", "##aff", "##able", "aff", "##a", "a", "b", "c", "##b", "##c", "hello", "world",
    ",", "!", ".", "'", "s", "##s", "\u4e2d", "\u6587", "cafe", "\u1100", "##\u1161",
    "##\u11a8", "\u0915", "##\u093f", "ab", "\u03c3\u03bf\u03c6\u03b9\u03b1", "ac",
    "\u2581", "##\u2581", "e", "##\u0301", "\u00e9", "##\u03c3",
]  # fmt: skip


def small(text: str, **config: Any) -> list[str]:
    """Tokens (as strings) of `text` over SMALL_VOCAB."""
    tok = WordPieceTokenizer(SMALL_VOCAB, WordPieceConfig(**config))
    return [SMALL_VOCAB[i] for i in tok.encode(text)]


def test_words_are_cut_into_the_longest_pieces_first() -> None:
    assert small("unaffable") == ["un", "##aff", "##able"]


def test_a_word_with_an_uncovered_part_is_one_unknown_token() -> None:
    assert small("unaffablez hello") == ["[UNK]", "hello"]


def test_a_word_over_the_character_limit_is_one_unknown_token() -> None:
    assert small("abab ababab", max_input_chars_per_word=5) == ["ab", "##a", "##b", "[UNK]"]


def test_punctuation_is_split_off_as_words_of_its_own() -> None:
    assert small("hello,world!") == ["hello", ",", "world", "!"]
    assert small("a's") == ["a", "'", "s"]


def test_text_is_lower_cased_and_non_spacing_marks_stripped() -> None:
    assert small("CAF\u00c9 Hello") == ["cafe", "hello"]


def test_spacing_marks_stay_when_accents_are_stripped() -> None:
    # U+093F DEVANAGARI VOWEL SIGN I is a spacing mark (Mc): llama.cpp dropped it.
    assert small("\u0915\u093f") == ["\u0915", "##\u093f"]


def test_a_cased_vocabulary_keeps_case_and_accents() -> None:
    assert small("e\u0301 \u00e9", lowercase=False) == ["e", "##\u0301", "\u00e9"]
    assert small("Hello", lowercase=False) == ["[UNK]"]


def test_hangul_syllables_decompose_into_all_their_jamo() -> None:
    # U+AC01 HANGUL SYLLABLE GAG = choseong kiyeok + jungseong a + jongseong kiyeok.
    assert small("\uac01") == ["\u1100", "##\u1161", "##\u11a8"]


def test_vertical_tab_form_feed_and_next_line_are_deleted_joining_words() -> None:
    assert small("a\x0bb a\x0cc a\x85b") == ["ab", "ac", "ab"]


def test_tab_newline_and_return_separate_words() -> None:
    assert small("a\tb\nc\rhello") == ["a", "b", "c", "hello"]


def test_nul_replacement_character_and_format_characters_are_deleted() -> None:
    assert small("a\x00b\ufffd\u200b") == ["ab"]


def test_cjk_ideographs_are_words_of_their_own() -> None:
    assert small("\u4e2d\u6587hello") == ["\u4e2d", "\u6587", "hello"]


def test_special_tokens_in_the_text_are_those_tokens() -> None:
    assert small("a[SEP]b [MASK]") == ["a", "[SEP]", "b", "[MASK]"]


def test_special_tokens_match_only_as_written() -> None:
    assert small("[sep]") == ["[UNK]", "[UNK]", "[UNK]"]  # "[", "sep", "]": none in the vocab
    assert small("[SEP]", special_tokens=()) == ["[UNK]", "[UNK]", "[UNK]"]


def test_capital_sigma_lowercases_alone_without_the_final_form() -> None:
    # Python's str.lower() would give a final sigma (U+03C2), which the vocabulary lacks.
    assert small("\u03a3\u039f\u03a6\u0399\u0391\u03a3") == [
        "\u03c3\u03bf\u03c6\u03b9\u03b1", "##\u03c3",
    ]  # fmt: skip


def test_u2581_is_an_ordinary_character_not_a_word_start() -> None:
    assert small("a\u2581") == ["a", "##\u2581"]
    assert small("\u2581") == ["\u2581"]


def test_a_vocabulary_without_its_unknown_token_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown token"):
        WordPieceTokenizer(["a", "b"])


def test_the_gguf_spelling_of_a_vocabulary_is_read_back_as_vocab_txt() -> None:
    stored = ["[PAD]", "[UNK]", "\u2581hello", "lo", "\u2581##", "\u2581\u2581"]
    assert vocabulary_from_gguf(stored, literal=[0, 1]) == [
        "[PAD]", "[UNK]", "hello", "##lo", "##", "\u2581",
    ]  # fmt: skip


def test_the_tokenizer_module_needs_only_the_standard_library_and_numpy() -> None:
    tree = ast.parse(Path(tokenizer_module.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 0
    }
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "numpy"}


# --- pure: truncation ------------------------------------------------------------------------


def _mixed_text(rng: random.Random, words: int) -> str:
    """Words that stress the cut: specials, long words, marks, controls, ideographs."""
    pool = [
        "hello", "world", "unaffable", "[CLS]", "[SEP]", "a[MASK]b", "x" * 150, "e\u0301" * 40,
        "\u0301\u0301", "\x0b", "\u4e2d\u6587", "hello,", "!!", "\u0915\u093f", "\u3000",
        "\u00a0", "[[CLS]]", "caf\u00e9", "\x85",
    ]  # fmt: skip
    seps = [" ", "", "\n", "\t", " , "]
    return "".join(rng.choice(pool) + rng.choice(seps) for _ in range(words))


def test_the_first_tokens_are_exactly_the_whole_texts_first_tokens() -> None:
    tok = WordPieceTokenizer(SMALL_VOCAB)
    rng = random.Random(17)
    for _ in range(200):
        text = _mixed_text(rng, rng.randrange(1, 400))
        whole = tok.encode(text)
        for n in (1, 7, 50, 254, 10_000):
            assert tok.first_tokens(text, n) == whole[:n]


def test_a_safe_cut_splits_a_text_into_parts_whose_ids_concatenate() -> None:
    tok = WordPieceTokenizer(SMALL_VOCAB)
    rng = random.Random(18)
    for _ in range(200):
        text = _mixed_text(rng, 60)
        cut = tok.safe_cut(text, 0, rng.randrange(len(text)))
        assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text)


def test_a_cut_never_falls_inside_a_special_token() -> None:
    tok = WordPieceTokenizer(SMALL_VOCAB)
    text = "a [CLS]" * 10
    for limit in range(1, len(text)):
        cut = tok.safe_cut(text, 0, limit)
        assert cut <= limit
        assert all(not (m < cut < m + 5) for m in range(len(text)) if text.startswith("[CLS]", m))


def test_truncating_a_huge_text_reads_only_about_what_the_tokens_need() -> None:
    tok = WordPieceTokenizer(SMALL_VOCAB)
    text = "hello world " * 4_000_000  # 48 MB
    end, ids = tok.grow_prefix(text, 254)
    assert len(ids) >= 254
    assert end < 254 * 12 * 4  # characters of 254 tokens here, times 4 for growing


def test_a_prefix_of_words_without_tokens_grows_until_tokens_come_out() -> None:
    tok = WordPieceTokenizer(SMALL_VOCAB)
    text = "\u0301" * 100_000 + " hello" * 10
    assert tok.first_tokens(text, 3) == [SMALL_VOCAB.index("hello")] * 3


# --- the reference's ids, stored (no `tokenizers` needed) -------------------------------------


@pytest.mark.parametrize("cls", sorted(EDGE_CASES))
def test_each_class_of_text_gives_the_stored_reference_ids(cls: str) -> None:
    tok = bundled_tokenizer()
    cases = reference_cases()[cls]
    assert cases
    for case in cases:
        assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_the_stored_reference_ids_cover_every_class() -> None:
    assert set(reference_cases()) == set(EDGE_CASES) | {"generated"}


def test_generated_multilingual_texts_give_the_stored_reference_ids() -> None:
    tok = bundled_tokenizer()
    for case in reference_cases()["generated"]:
        assert tok.encode(case["text"]) == case["ids"], case["locale"]


# --- against the reference tokenizer -----------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
def test_generated_text_gives_the_reference_ids(locale: str) -> None:
    texts = locale_texts(locale, TEXTS_PER_LOCALE)
    tok = bundled_tokenizer()
    assert [tok.encode(t) for t in texts] == oracle()(texts)


@pytest.mark.slow
@pytest.mark.parametrize("locale", LOCALES)
def test_many_generated_texts_give_the_reference_ids(locale: str) -> None:
    texts = locale_texts(locale, TEXTS_PER_LOCALE_SLOW, seed=1)
    tok = bundled_tokenizer()
    assert [tok.encode(t) for t in texts] == oracle()(texts)


@pytest.mark.parametrize("cls", sorted(EDGE_CASES))
def test_each_edge_case_gives_the_reference_ids(cls: str) -> None:
    tok = bundled_tokenizer()
    texts = EDGE_CASES[cls]
    assert [tok.encode(t) for t in texts] == oracle()(texts)


def test_the_stored_reference_ids_are_the_references() -> None:
    stored = [c for cases in reference_cases().values() for c in cases]
    assert [c["ids"] for c in stored] == oracle()([c["text"] for c in stored])


@pytest.mark.slow
def test_every_code_point_gives_the_reference_ids() -> None:
    """Every code point alone, inside a word, after a special token and with a spacing mark:
    where Python's Unicode tables and the reference's differ, the reference wins."""
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    tok = bundled_tokenizer()
    for template in ("a{c}b {c}{u}", "{c}", "x {c}y [CLS]{c}", "\u0915{c}\u093f {u}{c}a"):
        texts = [template.format(c=chr(cp), u=chr(cp).upper()) for cp in cps]
        expected = oracle()(texts)
        wrong = [
            hex(cp) for cp, t, e in zip(cps, texts, expected, strict=True) if tok.encode(t) != e
        ]
        assert not wrong, (template, wrong[:20])


def test_the_first_tokens_of_long_texts_are_the_references_first_tokens() -> None:
    tok = bundled_tokenizer()
    texts = [" ".join(locale_texts("th_TH", 40)), _accented(3000), _unknown_heavy(600)]
    for text, whole in zip(texts, oracle()(texts), strict=True):
        assert len(whole) > MAX_TOKENS
        assert tok.first_tokens(text, MAX_TOKENS - 2) == whole[: MAX_TOKENS - 2]


# --- end to end through the engine -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    pytest.importorskip("llama_cpp")
    from embedd.inference.engine import Model

    model = Model(BUNDLED, batch_tokens=512, max_tokens=MAX_TOKENS)
    yield model
    model.close()


@pytest.fixture(scope="module")
def context(engine: Any) -> Iterator[Any]:
    # One thread: llama.cpp's threads spin while they wait, and the suite shares its cores.
    ctx = engine.new_context(threads=1, pooling=None)
    yield ctx
    ctx.close()


def _accented(words: int) -> str:
    """Latin words under piles of combining accents (each letter carries three)."""
    rng = random.Random(3)
    marks = "\u0301\u0300\u0302\u0308\u0327\u030c"
    return " ".join(
        "".join(c + "".join(rng.choice(marks) for _ in range(3)) for c in rng.choice(WORDS))
        for _ in range(words)
    )


def _unknown_heavy(words: int) -> str:
    """Words of 101-300 characters (one [UNK] each) between ordinary ones."""
    rng = random.Random(4)
    return " ".join(
        rng.choice(WORDS) * rng.randrange(30, 60) if i % 2 else rng.choice(WORDS)
        for i in range(words)
    )


WORDS = ["hello", "world", "tokens", "about", "search"]


def _embed_packed(
    engine: Any, context: Any, seqs: list[list[int]]
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Vectors of `seqs`, as many to a batch as fit (fewer decodes)."""
    out, batch = [], list[list[int]]()
    for seq in [*seqs, None]:
        full = sum(map(len, batch)) + len(seq or ()) > engine.batch_tokens
        if batch and (seq is None or full or len(batch) == engine.max_seqs):
            out.append(context.embed(batch))
            batch = []
        if seq is not None:
            batch.append(seq)
    return np.concatenate(out)


def test_the_engine_reads_the_vocabulary_the_gguf_holds(engine: Any) -> None:
    assert engine.tokenizer._wordpiece.vocab == bundled_tokenizer().vocab
    assert engine.card["tokenizer"] == tokenizer_module.TOKENIZER_VERSION


def test_the_engine_tokenizes_every_reference_text_as_the_reference(engine: Any) -> None:
    docs = json.loads((DATA / "stdlib_docs.json").read_text())
    texts = docs["queries"] + docs["chunks"]
    tok = bundled_tokenizer()
    assert [engine.tokenize(t)[0] for t in texts] == [[CLS, *tok.encode(t), SEP] for t in texts]


def test_reference_texts_still_get_the_reference_vectors(engine: Any, context: Any) -> None:
    docs = json.loads((DATA / "stdlib_docs.json").read_text())
    # A sample: tests/test_vectors.py checks all 1,397 through the daemon.
    texts = docs["queries"][:64] + docs["chunks"][:16]
    expected = np.concatenate(
        [np.load(DATA / "st_queries.npy")[:64], np.load(DATA / "st_chunks.npy")[:16]]
    )
    got = _embed_packed(engine, context, [engine.tokenize(t)[0] for t in texts])
    assert cosines(got, expected).min() >= 0.9999


@pytest.mark.parametrize("locale", ["ko_KR", "hi_IN"])
def test_a_text_gets_the_vector_of_the_reference_ids(
    engine: Any, context: Any, locale: str
) -> None:
    text = locale_texts(locale, 1)[0]
    ids, _ = engine.tokenize(text, truncate_to=MAX_TOKENS)
    reference = [CLS, *oracle()([text])[0][: MAX_TOKENS - 2], SEP]
    assert cosines(context.embed([ids]), context.embed([reference])).min() >= 0.9999


@pytest.mark.parametrize("kind", ["thai", "accented", "unknown_heavy"])
def test_truncation_keeps_exactly_max_tokens_the_whole_text_begins_with(
    engine: Any, kind: str
) -> None:
    text = {
        "thai": lambda: " ".join(locale_texts("th_TH", 60)),
        "accented": lambda: _accented(4000),
        "unknown_heavy": lambda: _unknown_heavy(2000),
    }[kind]()
    whole, _ = engine.tokenize(text)
    assert len(whole) > MAX_TOKENS
    usable, partial = engine.usable_prefix(text)  # as the worker does
    ids, cut = engine.tokenize(usable, truncate_to=MAX_TOKENS)
    assert cut and partial
    assert ids == [*whole[: MAX_TOKENS - 1], SEP]


def test_a_50_mb_text_is_not_tokenized_whole(engine: Any) -> None:
    text = "x" * 150 + " " + "hello world " * 4_200_000
    usable, partial = engine.usable_prefix(text)
    assert partial
    assert len(usable) < 100_000
    assert len(engine.tokenize(usable)[0]) > MAX_TOKENS


def test_chunks_count_tokens_with_the_same_tokenizer(engine: Any) -> None:
    text = "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4. " * 200
    for c in engine.chunk(text, max_tokens=64):
        assert c.tokens == len(bundled_tokenizer().encode(text[c.start : c.end]))
        assert c.tokens + engine.frame_size <= 64


# --- regenerating the stored ids ---------------------------------------------------------------


def _regenerate() -> None:
    """Writes tests/data/tokenizer_reference.json from the reference tokenizer."""
    encode = oracle()
    classes: dict[str, list[dict[str, Any]]] = {
        cls: [{"text": t, "ids": ids} for t, ids in zip(texts, encode(texts), strict=True)]
        for cls, texts in sorted(EDGE_CASES.items())
    }
    generated = [(loc, locale_texts(loc, 2, seed=5)) for loc in LOCALES]
    classes["generated"] = [
        {"locale": loc, "text": t, "ids": ids}
        for loc, texts in generated
        for t, ids in zip(texts, encode(texts), strict=True)
    ]
    tk = pytest.importorskip("tokenizers")
    doc = {
        "how": "python -m tests.test_tokenizer: the ids Hugging Face's tokenizers "
        f"{tk.__version__} gives for each text, built from the bundled GGUF's vocabulary "
        "(BertNormalizer, BertPreTokenizer, WordPiece, special tokens as added tokens)",
        "classes": classes,
    }
    # One case a line: the file stays readable and its diffs small.
    lines = [f' "how": {json.dumps(doc["how"])},', ' "classes": {']
    for i, (cls, cases) in enumerate(classes.items()):
        lines.append(f"  {json.dumps(cls)}: [")
        lines += [f"   {json.dumps(c, ensure_ascii=False)}," for c in cases]
        lines[-1] = lines[-1].rstrip(",")
        lines.append("  ]" + ("," if i < len(classes) - 1 else ""))
    REFERENCE_IDS.write_text("{\n" + "\n".join(lines) + "\n }\n}\n")


if __name__ == "__main__":
    _regenerate()
