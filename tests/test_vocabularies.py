"""The vocabulary types embedd leaves to llama.cpp's tokenizer give the reference's ids.

Three types, each in a GGUF generated here (tests/gguf_models.py) over a small vocabulary
trained on faker text, so that the comparison exercises real segmentations:
- SentencePiece Unigram (llama.cpp's UGM) with XLM-RoBERTa's layout and an NFKC-based
  precompiled normalisation map: multilingual-e5, bge-m3, paraphrase-multilingual-mpnet;
- SentencePiece BPE with byte fallback and no dummy prefix: Gemma's (EmbeddingGemma);
- byte-level BPE with Qwen2's pre-tokenizer: Qwen3-Embedding.

The reference is Hugging Face's `tokenizers` (what sentence-transformers runs), built from the
same GGUF's vocabulary as each model's tokenizer.json declares it. embedd's ids are
`Model.tokenize`'s. Where they cannot agree, the texts are named here with the reason
(KNOWN_DEVIATIONS, `two_part_vowel_sign`), and docs/languages.md gives the
figures.
"""

from __future__ import annotations

import itertools
import unicodedata
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import pytest

from embedd.inference.engine import Model
from tests.gguf_models import (
    byte_level_pre_tokenizer,
    byte_level_vocabulary,
    sentencepiece_bpe_vocabulary,
    unigram_vocabulary,
    write_gemma_embedding,
    write_qwen3,
    write_xlm_roberta,
)

tk = pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")
faker = pytest.importorskip("faker")

KINDS = ["unigram", "sentencepiece_bpe", "byte_level_bpe"]
# Issue 17's scripts: accented Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari, Bengali,
# Tamil, Thai, CJK, Hangul, Armenian, Georgian.
LOCALES = [
    "fr_FR", "pl_PL", "vi_VN", "ru_RU", "el_GR", "ar_AA", "he_IL", "hi_IN", "bn_BD", "ta_IN",
    "th_TH", "zh_CN", "ja_JP", "ko_KR", "hy_AM", "ka_GE",
]  # fmt: skip
TEXTS_PER_LOCALE = 50
TEXTS_PER_LOCALE_SLOW = 400
TRAINING_TEXTS_PER_LOCALE = 40
VOCABULARY_SIZE = 2500

EDGE_CASES = [
    "",
    "  ",
    "\n",
    "  double  spaces  ",
    " leading",
    "trailing ",
    "trailing newline\n",
    "tab\tnew\nline\r\nreturn",
    "a\n\n\nb",
    "x\u3000y \u00a0nbsp \u2003em",
    "\u200bzero\u200bwidth\ufeff",
    "\ufb01 ligature \u2460 \uff21\uff22\uff23 \u00bd \u00b2",
    "e\u0301 \u00e9 cafe\u0301",
    "\u011e\u00dc\u015e\u0130\u00d6\u00c7 \u0130stanbul",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "emoji \U0001f600\U0001f469\u200d\U0001f4bb",
    "a\u2581b \u2581start",
    "x" * 300,
    "1234567890 3.14159 1,000,000",
    "don't you're I'LL we've",
    "<s> </s> <unk>",
    "<bos>x<eos> <pad>",
    "a<|endoftext|>b",
    "x <mask> y",
]

# Texts naming the vocabulary's special tokens: the reference reads each as that token (they
# are special added tokens in each model's tokenizer.json); llama.cpp, asked to tokenize text
# (parse_special off, as embedd asks), spells them out.
_LITERAL_SPECIALS = "the text names a special token: the reference reads it as that token"
KNOWN_DEVIATIONS: dict[str, dict[str, str]] = {
    "unigram": {
        "<s> </s> <unk>": _LITERAL_SPECIALS,
        "<bos>x<eos> <pad>": _LITERAL_SPECIALS,
        "x <mask> y": _LITERAL_SPECIALS,
    },
    "sentencepiece_bpe": {
        "<s> </s> <unk>": _LITERAL_SPECIALS,
        "<bos>x<eos> <pad>": _LITERAL_SPECIALS,
    },
    "byte_level_bpe": {"a<|endoftext|>b": _LITERAL_SPECIALS},
}


def two_part_vowel_sign(text: str) -> bool:
    """Whether `text` writes a vowel sign in two parts that compose into one character (Tamil
    ொ as ெ + ா, Bengali ো as ে + া, Malayalam, Sinhala...).

    A Unigram model's normalisation map composes them (NFKC). llama.cpp, like SentencePiece,
    applies the map wherever an entry matches; the reference's `Precompiled` normaliser applies
    it one grapheme cluster at a time and matches a longer entry only at a cluster's start, so
    after a consonant it leaves the two marks apart and the pieces differ. Fixing this in embedd
    would mean tokenizing Unigram vocabularies in Python; docs/languages.md gives the share of
    texts.
    """
    return any(
        unicodedata.category(a).startswith("M") and len(unicodedata.normalize("NFC", a + b)) == 1
        for a, b in itertools.pairwise(text)
    )


# --- text, models and references -------------------------------------------------------------


@cache
def locale_texts(locale: str, n: int, seed: int = 17) -> tuple[str, ...]:
    """`n` texts in a locale's script: a name, an address, a city, a company, a job and running
    text (several locales' running text is Latin lorem ipsum; their names are not)."""
    fake = faker.Faker(locale)
    fake.seed_instance(seed)
    return tuple(
        " ".join(
            [fake.name(), fake.address(), fake.city(), fake.company(), fake.job(), fake.text(200)]
        )
        for _ in range(n)
    )


def _gguf_vocabulary(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    keys = ("tokens", "token_type", "scores", "merges", "precompiled_charsmap")
    return {
        key: reader.fields[f"tokenizer.ggml.{key}"].contents()
        for key in keys
        if f"tokenizer.ggml.{key}" in reader.fields
    }


def _with_special_tokens(ref: Any, vocab: dict[str, Any]) -> Any:
    """Control and unknown tokens as special added tokens, as the models' tokenizer.json have."""
    special = (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)
    ref.add_special_tokens(
        [
            tk.AddedToken(token, special=True, normalized=False)
            for token, kind in zip(vocab["tokens"], vocab["token_type"], strict=True)
            if kind in special
        ]
    )
    return ref


def unigram_reference(vocab: dict[str, Any]) -> Any:
    """XLM-RoBERTa's tokenizer.json: the precompiled map, runs of spaces collapsed, Metaspace
    (a word-start mark, always prepended), Unigram over the scored pieces."""
    model = tk.models.Unigram(
        list(zip(vocab["tokens"], vocab["scores"], strict=True)),
        unk_id=vocab["token_type"].index(gguf.TokenType.UNKNOWN),
    )
    ref = tk.Tokenizer(model)
    ref.normalizer = tk.normalizers.Sequence(
        [
            tk.normalizers.Precompiled(bytes(vocab["precompiled_charsmap"])),
            tk.normalizers.Replace(tk.Regex(" {2,}"), " "),
        ]
    )
    ref.pre_tokenizer = tk.pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="always", split=True
    )
    return _with_special_tokens(ref, vocab)


def sentencepiece_bpe_reference(vocab: dict[str, Any]) -> Any:
    """Gemma's tokenizer.json: spaces as `▁`, no pre-tokenizer, BPE with byte fallback whose
    merges are every pair of pieces that makes a piece, ranked by that piece's score (the GGUF
    holds scores; Hugging Face's converter derives the merges from them so)."""
    tokens, scores = vocab["tokens"], vocab["scores"]
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for i, token in enumerate(tokens):
        if vocab["token_type"][i] != gguf.TokenType.NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right]))
    merges = [(tokens[left], tokens[right]) for _, _, left, right in sorted(ranked)]
    model = tk.models.BPE(ids, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    ref = tk.Tokenizer(model)
    ref.normalizer = tk.normalizers.Replace(" ", "\u2581")
    return _with_special_tokens(ref, vocab)


def byte_level_bpe_reference(vocab: dict[str, Any]) -> Any:
    """Qwen2's tokenizer.json: NFC, Qwen2's split, bytes as GPT-2's alphabet, BPE merges."""
    ids = {token: i for i, token in enumerate(vocab["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in vocab["merges"]]
    ref = tk.Tokenizer(tk.models.BPE(ids, merges))
    ref.normalizer = tk.normalizers.NFC()
    ref.pre_tokenizer = byte_level_pre_tokenizer()
    return _with_special_tokens(ref, vocab)


REFERENCES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "unigram": unigram_reference,
    "sentencepiece_bpe": sentencepiece_bpe_reference,
    "byte_level_bpe": byte_level_bpe_reference,
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    corpus = [t for loc in LOCALES for t in locale_texts(loc, TRAINING_TEXTS_PER_LOCALE, 1)]
    directory = tmp_path_factory.mktemp("vocabularies")
    return {
        "unigram": write_xlm_roberta(
            directory / "unigram.gguf", unigram_vocabulary(corpus, VOCABULARY_SIZE)
        ),
        "sentencepiece_bpe": write_gemma_embedding(
            directory / "spm-bpe.gguf", vocab=sentencepiece_bpe_vocabulary(corpus, VOCABULARY_SIZE)
        ),
        "byte_level_bpe": write_qwen3(
            directory / "byte-bpe.gguf", vocab=byte_level_vocabulary(corpus, VOCABULARY_SIZE)
        ),
    }


@pytest.fixture(scope="module")
def engines(models: dict[str, Path]) -> Iterator[dict[str, Model]]:
    opened = {kind: Model(path, batch_tokens=512, max_tokens=512) for kind, path in models.items()}
    yield opened
    for engine in opened.values():
        engine.close()


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str, Callable[[list[str]], list[list[int]]]]:
    def encoder(ref: Any) -> Callable[[list[str]], list[list[int]]]:
        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]

        return encode

    return {
        kind: encoder(REFERENCES[kind](_gguf_vocabulary(path))) for kind, path in models.items()
    }


def framed(engine: Model, ids: list[int]) -> list[int]:
    """`ids` in the special tokens the model frames every input in (`<s>` ... `</s>`)."""
    return [*engine._head, *ids, *engine._tail]


def differing(
    engine: Model, encode: Callable[[list[str]], list[list[int]]], texts: list[str]
) -> list[str]:
    """The texts whose ids from `Model.tokenize` are not the reference's."""
    return [
        text
        for text, ref in zip(texts, encode(texts), strict=True)
        if engine.tokenize(text)[0] != framed(engine, ref)
    ]


def unexplained(
    kind: str,
    engine: Model,
    encode: Callable[[list[str]], list[list[int]]],
    texts: list[str],
) -> list[str]:
    """Those of `texts` whose ids differ from the reference's for no known reason. A two-part
    vowel sign explains a Unigram text only if the text written composed gives the reference's
    ids (so nothing else in it differs)."""
    known = KNOWN_DEVIATIONS[kind]
    out = [t for t in differing(engine, encode, texts) if t not in known]
    if kind == "unigram":
        split = [t for t in out if two_part_vowel_sign(t)]
        composed = [unicodedata.normalize("NFC", t) for t in split]
        still = set(differing(engine, encode, composed))
        explained = {t for t, c in zip(split, composed, strict=True) if c not in still}
        out = [t for t in out if t not in explained]
    return out


# --- generated multilingual text --------------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_generated_text_gives_the_reference_ids(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
    kind: str,
    locale: str,
) -> None:
    texts = list(locale_texts(locale, TEXTS_PER_LOCALE))
    assert unexplained(kind, engines[kind], references[kind], texts) == []


@pytest.mark.slow
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("kind", KINDS)
def test_many_generated_texts_give_the_reference_ids(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
    kind: str,
    locale: str,
) -> None:
    texts = list(locale_texts(locale, TEXTS_PER_LOCALE_SLOW, seed=23))
    assert unexplained(kind, engines[kind], references[kind], texts) == []


# --- edge cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_edge_case_gives_the_reference_ids_unless_a_known_deviation(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
    kind: str,
) -> None:
    assert unexplained(kind, engines[kind], references[kind], EDGE_CASES) == []


@pytest.mark.parametrize("kind", KINDS)
def test_each_known_deviation_still_deviates(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
    kind: str,
) -> None:
    """A listed deviation that stops deviating (a newer llama.cpp, a fix here) must leave the
    list and docs/languages.md, not linger as an excuse."""
    known = list(KNOWN_DEVIATIONS[kind])
    assert differing(engines[kind], references[kind], known) == known


@pytest.mark.parametrize(
    "text",
    [
        "\u0b89\u0baf\u0bbf\u0bb0\u0bc6\u0bbe\u0bb5\u0bbf\u0baf\u0bae\u0bcd",  # Tamil, ொ in two
        "\u0995\u09c7\u09be\u09a5\u09be\u09af\u09bc",  # Bengali, ো in two
    ],
)
def test_a_unigram_vocabulary_composes_a_two_part_vowel_sign_the_reference_keeps_apart(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
    text: str,
) -> None:
    assert two_part_vowel_sign(text)
    assert differing(engines["unigram"], references["unigram"], [text]) == [text]
    composed = unicodedata.normalize("NFC", text)
    assert not two_part_vowel_sign(composed)
    assert differing(engines["unigram"], references["unigram"], [composed]) == []


def test_a_unigram_vocabulary_keeps_whitespace_ending_a_text_as_the_reference_does(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
) -> None:
    """llama.cpp drops it (as SentencePiece does); XLM-RoBERTa's reference keeps one `▁`,
    also for what its map turns into a space (a zero-width space, a BOM)."""
    engine, encode = engines["unigram"], references["unigram"]
    texts = ["word ", "word\n", "word \u3000 \n", " ", "word\u200b", "word\ufeff"]
    assert differing(engine, encode, texts) == []
    word, _ = engine.tokenize("word")
    assert engine.tokenize("word ")[0] == [
        *word[:-1],
        engine.vocabulary().index("\u2581"),
        word[-1],
    ]
    assert engine.card["tokenizer"].endswith("+trailing-space")


def test_characters_the_map_deletes_at_the_end_add_no_word_start(
    engines: dict[str, Model],
    references: dict[str, Callable[[list[str]], list[list[int]]]],
) -> None:
    engine = engines["unigram"]
    assert engine.tokenize("word\x01\x7f")[0] == engine.tokenize("word")[0]
    assert differing(engine, references["unigram"], ["word\x01\x7f", "word \x01"]) == []


def test_the_other_vocabulary_types_keep_their_tokenizer_version(
    engines: dict[str, Model],
) -> None:
    assert not engines["sentencepiece_bpe"].card["tokenizer"].endswith("+trailing-space")
    assert engines["byte_level_bpe"].card["tokenizer"].endswith("+nfc")
