"""WordPiece tokenizing exactly as the reference implementation does.

The vectors a BERT model was trained for come from Hugging Face's BERT tokenizer (the
`tokenizers` package's BertNormalizer + BertPreTokenizer + WordPiece, which sentence-transformers
uses). llama.cpp's own WordPiece tokenizer deviates from it: it drops the vowels of Hangul
syllables, every combining mark (Indic vowel signs included), splits words at VT/FF/NEL, spells
out words over 100 characters, reads U+2581 as a word start and takes `[CLS]` typed in the text
as text. Each of those silently moves vectors away from the reference (Korean texts to cosine
~0.46), so embedd tokenizes BERT vocabularies here and hands the ids to llama.cpp.

The steps, in the reference's order:
1. special tokens typed literally in the text (`[CLS]`, `[SEP]`, ...) are split out first, on
   the raw text, and become those tokens;
2. each stretch between them is cleaned (NUL, U+FFFD and "other" characters, categories
   Cc/Cf/Co except tab/newline/return, are deleted; whitespace separates words), accents are
   stripped (NFD, then non-spacing marks, category Mn, are dropped: spacing marks Mc stay) and
   the text is lower-cased one character at a time (no final-sigma rule);
3. words are split at whitespace, and punctuation and CJK ideographs become words of their own;
4. each word is cut greedily into the longest vocabulary pieces, continuations spelled with
   `##`; a word with a character no piece covers, or over 100 characters, is one `[UNK]`.

Pure Python (the standard library, and numpy to find the end of a long word in one step): the
tokenizer is built from a plain list of token strings plus a `WordPieceConfig`, so it is
testable without llama.cpp; the daemon builds one from the vocabulary a model process reports.

However long the text, no single call here is handed more than `MAX_SLICE` characters: a text
is tokenized only as far as its use needs (`grow_prefix`), and a word without end in sight is
measured a slice at a time, so the coordinating thread never holds the GIL for long.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# Goes into vector-cache keys and `embedd index` fingerprints: bump it whenever some text's ids
# change, so vectors computed with the old ids are never served or mixed with new ones.
TOKENIZER_VERSION = "wordpiece-hf-1"

# llama.cpp's BERT converter (convert_hf_to_gguf.py, BertModel.set_vocab) stores word-initial
# pieces as U+2581 + piece and continuations without their "##"; special tokens stay as is.
PHANTOM_SPACE = "\u2581"
CONTINUATION = "##"
# BertTokenizer's and `tokenizers`' WordPiece default (max_input_chars_per_word).
MAX_INPUT_CHARS_PER_WORD = 100
# The BERT vocabularies' special tokens, as written in their vocab.txt.
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Words whose pieces are remembered: real text repeats a few thousand words over and over, so
# most words cost one dict lookup. Cleared when full (a bound on memory, not an LRU).
_WORD_CACHE_SIZE = 1 << 17
# The first prefix `grow_prefix` tries, in characters per wanted token: English averages ~4.5
# characters a token (the reference chunks: 1,150 characters for 166 tokens); most scripts need
# one doubling at most.
_PREFIX_CHARS_PER_TOKEN = 6
# Characters searched back at first for a separator to cut at (then four times more, and so on).
_CUT_WINDOW = 256
# The most characters one regular-expression or normalisation call is given: each such call
# holds the GIL from start to end (the event loop and every other model's coordinator wait), and
# 64 K characters take well under a millisecond; a longer text is worked through in such slices.
MAX_SLICE = 1 << 16
# Characters normalised at a time while measuring a word without separators: a word is [UNK]
# once its normalised form passes max_input_chars_per_word, usually within the first slice.
_RUN_SLICE = 4096

# The Unicode White_Space property (what the reference's Rust `char::is_whitespace` tests).
# VT, FF and NEL are in it, but they are "other" (Cc) characters, deleted before words are split.
_WHITE_SPACE = (
    (0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680),
    (0x2000, 0x200A), (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
)  # fmt: skip
_KEPT_CONTROLS = "\t\n\r"
# The White_Space characters that cleaning keeps (it deletes VT, FF and NEL).
_KEPT_SPACE = tuple(r for r in ((0x09, 0x0A), (0x0D, 0x0D), *_WHITE_SPACE[1:]) if r != (0x85, 0x85))
# The CJK ideograph blocks that BERT writes as words of their own (BertNormalizer's
# handle_chinese_chars; Hangul, kana and the other CJK scripts are ordinary letters there).
_CJK_IDEOGRAPHS = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip
# Where Python's Unicode tables (14.0) and the reference's (the Rust crate `unicode_categories`,
# older) disagree, the reference wins. Measured by tokenizing every code point both ways with
# `tokenizers` 0.23.3 (tests/test_tokenizer.py, the slow all-code-points test): these
# characters, assigned or re-categorised since, are ordinary letters to the reference...
_REFERENCE_LETTERS = (
    (0x61D, 0x61D), (0x7FD, 0x7FD), (0x890, 0x891), (0x898, 0x89F), (0x8CA, 0x8E2),
    (0x9FD, 0x9FE), (0xA76, 0xA76), (0xAFA, 0xAFF), (0xB55, 0xB55), (0xC04, 0xC04),
    (0xC3C, 0xC3C), (0xC77, 0xC77), (0xC84, 0xC84), (0xD00, 0xD00), (0xD3B, 0xD3C),
    (0xD81, 0xD81), (0xEBA, 0xEBA), (0x180F, 0x180F), (0x1885, 0x1886), (0x1ABF, 0x1ACE),
    (0x1B7D, 0x1B7E), (0x1DF6, 0x1DFB), (0x2E43, 0x2E4F), (0x2E52, 0x2E5D), (0xA82C, 0xA82C),
    (0xA8C5, 0xA8C5), (0xA8FF, 0xA8FF), (0xA9BD, 0xA9BD), (0x10D24, 0x10D27), (0x10EAB, 0x10EAD),
    (0x10F46, 0x10F50), (0x10F55, 0x10F59), (0x10F82, 0x10F89), (0x11070, 0x11070),
    (0x11073, 0x11074), (0x110C2, 0x110C2), (0x110CD, 0x110CD), (0x111CF, 0x111CF),
    (0x1123E, 0x1123E), (0x1133B, 0x1133B), (0x11438, 0x1143F), (0x11442, 0x11444),
    (0x11446, 0x11446), (0x1144B, 0x1144F), (0x1145A, 0x1145B), (0x1145D, 0x1145E),
    (0x11660, 0x1166C), (0x116B9, 0x116B9), (0x1182F, 0x11837), (0x11839, 0x1183B),
    (0x1193B, 0x1193C), (0x1193E, 0x1193E), (0x11943, 0x11946), (0x119D4, 0x119D7),
    (0x119DA, 0x119DB), (0x119E0, 0x119E0), (0x119E2, 0x119E2), (0x11A01, 0x11A0A),
    (0x11A33, 0x11A38), (0x11A3B, 0x11A47), (0x11A51, 0x11A56), (0x11A59, 0x11A5B),
    (0x11A8A, 0x11A96), (0x11A98, 0x11A9C), (0x11A9E, 0x11AA2), (0x11C30, 0x11C36),
    (0x11C38, 0x11C3D), (0x11C3F, 0x11C3F), (0x11C41, 0x11C45), (0x11C70, 0x11C71),
    (0x11C92, 0x11CA7), (0x11CAA, 0x11CB0), (0x11CB2, 0x11CB3), (0x11CB5, 0x11CB6),
    (0x11D31, 0x11D36), (0x11D3A, 0x11D3A), (0x11D3C, 0x11D3D), (0x11D3F, 0x11D45),
    (0x11D47, 0x11D47), (0x11D90, 0x11D91), (0x11D95, 0x11D95), (0x11D97, 0x11D97),
    (0x11EF3, 0x11EF4), (0x11EF7, 0x11EF8), (0x11FFF, 0x11FFF), (0x12FF1, 0x12FF2),
    (0x13430, 0x13438), (0x16E97, 0x16E9A), (0x16F4F, 0x16F4F), (0x16FE2, 0x16FE2),
    (0x16FE4, 0x16FE4), (0x1CF00, 0x1CF2D), (0x1CF30, 0x1CF46), (0x1E000, 0x1E006),
    (0x1E008, 0x1E018), (0x1E01B, 0x1E021), (0x1E023, 0x1E024), (0x1E026, 0x1E02A),
    (0x1E130, 0x1E136), (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF), (0x1E944, 0x1E94A),
    (0x1E95E, 0x1E95F),
)  # fmt: skip
# ... U+166D CANADIAN SYLLABICS CHI SIGN (So today) and U+111C9 SHARADA SANDHI MARK (Mn) are
# punctuation (Po), and U+1734 HANUNOO SIGN PAMUDPOD is a non-spacing mark (Mn, Mc today).
_REFERENCE_PUNCTUATION = (0x166D, 0x111C9)
_REFERENCE_NONSPACING = (0x1734,)
# Planes 4-13 hold no characters in any Unicode version Python ships; planes 15-16 are private
# use (Co) throughout but for their last two code points (noncharacters, Cn). Only the other
# planes need scanning for categories.
_SCANNED_PLANES = ((0x0, 0x3FFFF), (0xE0000, 0xEFFFF))
_PRIVATE_USE_PLANES = ((0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    """The body of a regex character class (no brackets) matching the given ranges."""
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" if hi > lo else f"\\U{lo:08x}" for lo, hi in ranges)


def _ranges(points: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for cp in sorted(points):
        if out and out[-1][1] == cp - 1:
            out[-1] = (out[-1][0], cp)
        else:
            out.append((cp, cp))
    return out


@dataclass(frozen=True)
class _Tables:
    """Compiled patterns over Unicode categories (built once per process: ~60 ms)."""

    deleted: re.Pattern[str]  # removed by cleaning
    nonspacing: re.Pattern[str]  # Mn, removed when stripping accents
    words: re.Pattern[str]  # a word, a punctuation character or a CJK ideograph
    separators: re.Pattern[str]  # where a text can be cut without changing its words
    # The same separators as a table by code point, to find one in a long text vectorised.
    separator_table: npt.NDArray[np.bool_]


@functools.cache
def _tables() -> _Tables:
    deleted: list[int] = [0, 0xFFFD]
    nonspacing: list[int] = []
    punct: list[int] = [cp for cp in range(0x21, 0x7F) if not chr(cp).isalnum()]
    category = unicodedata.category
    letters = {cp for lo, hi in _REFERENCE_LETTERS for cp in range(lo, hi + 1)}
    for lo, hi in _SCANNED_PLANES:
        for cp in range(lo, hi + 1):
            if cp in letters:
                continue
            cat = category(chr(cp))
            if cp in _REFERENCE_PUNCTUATION:
                punct.append(cp)
            elif cp in _REFERENCE_NONSPACING:
                nonspacing.append(cp)
            elif cat in ("Cc", "Cf", "Co"):
                deleted.append(cp)
            elif cat == "Mn":
                nonspacing.append(cp)
            elif cat[0] == "P":
                punct.append(cp)
    deleted = [cp for cp in deleted if chr(cp) not in _KEPT_CONTROLS]
    deleted_class = _char_class(_ranges(deleted)) + _char_class(_PRIVATE_USE_PLANES)
    space = _char_class(_WHITE_SPACE)
    single = _char_class(_ranges(punct)) + _char_class(_CJK_IDEOGRAPHS)
    return _Tables(
        deleted=re.compile(f"[{deleted_class}]+"),
        nonspacing=re.compile(f"[{_char_class(_ranges(nonspacing))}]+"),
        words=re.compile(f"[{single}]|[^{single}{space}]+"),
        # Whitespace that cleaning keeps, punctuation and ideographs: each ends the word before it.
        separators=re.compile(f"[{single}{_char_class(_KEPT_SPACE)}]"),
        separator_table=_table([*_ranges(punct), *_CJK_IDEOGRAPHS, *_KEPT_SPACE]),
    )


def _table(ranges: Iterable[tuple[int, int]]) -> npt.NDArray[np.bool_]:
    table = np.zeros(0x110000, dtype=np.bool_)
    for lo, hi in ranges:
        table[lo : hi + 1] = True
    return table


# ASCII text skips the Unicode steps: deleting its control characters is all cleaning does.
_ASCII_DELETED = {cp: None for cp in [*range(0x20), 0x7F] if chr(cp) not in _KEPT_CONTROLS}
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")


@dataclass(frozen=True)
class WordPieceConfig:
    """How a BERT vocabulary is applied (BertNormalizer's and WordPiece's settings)."""

    lowercase: bool = True
    # None: strip accents exactly when lower-casing (the reference's default for BERT).
    strip_accents: bool | None = None
    unk_token: str = "[UNK]"
    # Tokens matched in the raw text before anything else (the vocabulary's added tokens).
    special_tokens: tuple[str, ...] = BERT_SPECIAL_TOKENS
    max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD
    continuation: str = CONTINUATION


class WordPieceTokenizer:
    """BERT's tokenizer over one vocabulary; `encode` gives the bare ids (no [CLS]/[SEP])."""

    def __init__(self, tokens: Sequence[str], config: WordPieceConfig | None = None) -> None:
        self.config = config = config or WordPieceConfig()
        # A duplicated string maps to its first id, as in a vocab.txt read top to bottom.
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        self.vocab = vocab
        self.tokens = list(tokens)
        if config.unk_token not in vocab:
            raise ValueError(f"the vocabulary has no unknown token {config.unk_token!r}")
        self.unk_id = vocab[config.unk_token]
        self._lowercase = config.lowercase
        self._strip = config.lowercase if config.strip_accents is None else config.strip_accents
        self._max_word = config.max_input_chars_per_word
        self._cont = config.continuation
        self._longest = max((len(t) for t in vocab), default=1)
        specials = sorted({t for t in config.special_tokens if t in vocab}, key=len, reverse=True)
        self._special_ids = {t: vocab[t] for t in specials}
        # Leftmost, then longest: the alternation tries longer tokens first.
        self._special = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._special_longest = max((len(t) for t in specials), default=0)
        self._words: dict[str, tuple[int, ...]] = {}
        self._tables = _tables()
        # Where a stretch without separators may end: a separator, or a special token's start.
        self._run_ends = self._tables.separator_table
        if specials:
            self._run_ends = self._run_ends.copy()
            self._run_ends[[ord(t[0]) for t in specials]] = True

    # --- the pipeline -----------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without the special frame."""
        out: list[int] = []
        special = self._special
        if special is None or special.search(text) is None:
            self._encode_plain(text, out)
            return out
        pos = 0
        for m in special.finditer(text):
            if m.start() > pos:
                self._encode_plain(text[pos : m.start()], out)
            out.append(self._special_ids[m.group()])
            pos = m.end()
        if pos < len(text):
            self._encode_plain(text[pos:], out)
        return out

    def encode_with_spans(self, text: str) -> list[tuple[int, int, int, bool]] | None:
        """`encode(text)` with where each token came from: (id, start, end, special), the
        [start, end) characters of `text` it stands for (a word piece's own characters, an
        [UNK] its whole word, a special token written in the text its match). Characters
        are normalised one at a time to map the normalised text back; where that differs
        from normalising the whole text (a rare reordering of combining marks), the ids
        would differ, and None says the spans are unknown."""
        out: list[tuple[int, int, int, bool]] = []
        pos = 0
        matches = self._special.finditer(text) if self._special is not None else ()
        for m in matches:
            self._plain_spans(text, pos, m.start(), out)
            out.append((self._special_ids[m.group()], m.start(), m.end(), True))
            pos = m.end()
        self._plain_spans(text, pos, len(text), out)
        return out if [t[0] for t in out] == self.encode(text) else None

    def _plain_spans(
        self, text: str, lo: int, hi: int, out: list[tuple[int, int, int, bool]]
    ) -> None:
        origin: list[int] = []
        parts: list[str] = []
        for i in range(lo, hi):
            part = self.normalize(text[i])
            parts.append(part)
            origin.extend([i] * len(part))
        for m in self._tables.words.finditer("".join(parts)):
            ids = self._word_ids(m.group())
            if len(ids) == 1:
                out.append((ids[0], origin[m.start()], origin[m.end() - 1] + 1, False))
                continue
            at = m.start()
            for j, tid in enumerate(ids):
                piece = self.tokens[tid]
                width = len(piece) - (len(self._cont) if j else 0)
                out.append((tid, origin[at], origin[at + width - 1] + 1, False))
                at += width

    def _encode_plain(self, text: str, out: list[int]) -> None:
        if text.isascii():
            text = text.translate(_ASCII_DELETED)
            words = _ASCII_WORDS.findall(text.lower() if self._lowercase else text)
        else:
            words = self._tables.words.findall(self.normalize(text))
        cache = self._words
        for word in words:
            ids = cache.get(word)
            if ids is None:
                ids = self._word_ids(word)
                if len(cache) >= _WORD_CACHE_SIZE:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def normalize(self, text: str) -> str:
        """BertNormalizer's output for text without special tokens, less its whitespace
        mapping and CJK spacing (the word pattern treats those as separators directly)."""
        tables = self._tables
        text = tables.deleted.sub("", text)
        if self._strip:
            text = tables.nonspacing.sub("", unicodedata.normalize("NFD", text))
        if self._lowercase:
            # The reference lower-cases each character alone; Python's str.lower applies the
            # final-sigma rule (word-final capital sigma to U+03C2), so sigma goes first.
            text = text.replace("\u03a3", "\u03c3").lower()
        return text

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first pieces of one word; one [UNK] if any part has none."""
        n = len(word)
        if n > self._max_word:
            return (self.unk_id,)
        vocab = self.vocab
        ids: list[int] = []
        start = 0
        while start < n:
            prefix = self._cont if start else ""
            for end in range(min(n, start + self._longest), start, -1):
                tid = vocab.get(prefix + word[start:end])
                if tid is not None:
                    ids.append(tid)
                    start = end
                    break
            else:
                return (self.unk_id,)
        return tuple(ids)

    # --- long texts -------------------------------------------------------------------------

    def safe_cut(self, text: str, lo: int, limit: int) -> int:
        """The last position p in (lo, limit] where text[lo:p] and text[p:] tokenize to what
        text[lo:] gives (their ids concatenated), `lo` itself if there is none; `lo` must be
        such a position already. A cut is safe at a special token's edge, or right before a
        separator (kept whitespace, punctuation, an ideograph: each ends the word before it,
        and none changes in normalising) that is not inside a special token."""
        if limit >= len(text):
            return len(text)
        spans: list[tuple[int, int]] = []
        if self._special is not None:
            # Matching from a safe position finds what matching the whole text would: no
            # special token spans it. Any token starting at or before `limit` ends in reach.
            end = min(len(text), limit + self._special_longest)
            spans = [m.span() for m in self._special.finditer(text, lo, end)]
        best = max((e for span in spans for e in span if e <= limit), default=lo)
        starts = [s for s, _ in spans]
        seps = self._tables.separators
        hi, window = limit + 1, _CUT_WINDOW
        while hi > best + 1:
            w_lo = max(best + 1, hi - window)
            for p in reversed([m.start() for m in seps.finditer(text, w_lo, hi)]):
                k = bisect.bisect_left(starts, p) - 1
                if k < 0 or spans[k][1] <= p:
                    return p
            hi, window = w_lo, min(window * 4, MAX_SLICE)
        return best

    def grow_prefix(self, text: str, n: int) -> tuple[int, list[int]]:
        """A prefix of `text` ending at a safe cut with at least `n` tokens (the whole text if
        it has fewer), and that prefix's ids: the whole text's first ids, without tokenizing
        more of it than about twice what they need. The prefix grows (doubling) until enough
        tokens come out, so no assumption about characters per token can under-read: an [UNK]
        may span a whole word, and marks and control characters give no tokens at all."""
        ids: list[int] = []
        done = 0
        want = min(MAX_SLICE, max(1, n) * _PREFIX_CHARS_PER_TOKEN)
        while done < len(text) and len(ids) < n:
            cut = self.safe_cut(text, done, done + want)
            if cut > done:
                # Safe cuts concatenate: the next stretch's ids follow this one's.
                ids.extend(self.encode(text[done:cut]))
                done = cut
                want = min(MAX_SLICE, want * 2)
            else:
                # No separator in reach: one word without end in sight (Hangul syllables,
                # letters joined by ZWJ, a megabyte of "a"), taken in bounded slices.
                done, run = self._run(text, done)
                ids.extend(run)
        return done, ids

    def _run(self, text: str, start: int) -> tuple[int, list[int]]:
        """Where the stretch without separators that starts at `start` ends (a safe cut), and
        its ids, found without ever handing a whole long stretch to one C call: it is one word
        of the reference, [UNK] once its normalised form is longer than max_input_chars_per_word
        (normalising deletes control and format characters and strips marks, so the raw length
        alone does not say)."""
        if self._run_ends[ord(text[start])]:
            # A cut sits right before a separator: that one character (or the special token
            # starting there) is a word of its own, and a safe cut follows it.
            special = self._special.match(text, start) if self._special is not None else None
            cut = special.end() if special is not None else start + 1
            return cut, self.encode(text[start:cut])
        end = self._run_end(text, start)
        parts: list[str] = []
        length = 0
        for lo in range(start, end, _RUN_SLICE):
            part = self.normalize(text[lo : min(end, lo + _RUN_SLICE)])
            length += len(part)
            if length > self._max_word:
                return end, [self.unk_id]
            parts.append(part)
        ids: list[int] = []
        for word in self._tables.words.findall("".join(parts)):
            ids.extend(self._word_ids(word))
        return end, ids

    def _run_end(self, text: str, start: int) -> int:
        """The first separator or special token after `start`, or the text's end: a slice at
        a time, looked up by code point in one vectorised step (matching the separator class
        character by character took seconds over 20 MB)."""
        table = self._run_ends
        pos = start + 1
        while pos < len(text):
            hi = min(len(text), pos + MAX_SLICE)
            codes = np.frombuffer(text[pos:hi].encode("utf-32-le", "surrogatepass"), "<u4")
            for i in np.flatnonzero(table[codes]).tolist():
                at = pos + i
                if self._tables.separators.match(text, at) is not None:
                    return at
                if self._special is not None and self._special.match(text, at) is not None:
                    return at
            pos = hi
        return len(text)

    def first_tokens(self, text: str, n: int) -> list[int]:
        """Exactly the first `n` ids of `encode(text)` (all of them if it has fewer)."""
        return self.grow_prefix(text, n)[1][:n]


# --- from a GGUF's vocabulary -----------------------------------------------------------------


def vocabulary_from_gguf(texts: Sequence[str], literal: Iterable[int]) -> list[str]:
    """The vocab.txt strings of a llama.cpp BERT vocabulary: U+2581 + piece is a word-initial
    piece, a bare piece a continuation (its "##" was removed), and the `literal` ids (special
    and user-defined tokens) are stored unchanged."""
    keep = set(literal)
    out = []
    for i, text in enumerate(texts):
        if i in keep:
            out.append(text)
        elif text.startswith(PHANTOM_SPACE):
            out.append(text[len(PHANTOM_SPACE) :])
        else:
            out.append(CONTINUATION + text)
    return out
