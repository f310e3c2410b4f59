"""A model's texts turned into its token ids, in the daemon: the special frame, truncation that
keeps it, the part of a long text that can matter, and chunking within the model's limit.

BERT vocabularies are tokenized here by embedd's WordPiece (exactly as the reference does);
other vocabulary types by llama.cpp, which lives in the model process, through `raw` (a call
over its pipe). What llama.cpp alone can say about a vocabulary (its special frame, its longest
token, whether whitespace at the end counts) comes from the model process once, at load, as a
`TokenizerSpec`.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Iterator

from ..wire.answers import TokenPiece
from .chunking import TextPiece, iter_chunks
from .pipe import TokenizerSpec
from .tokenizer import MAX_SLICE, WordPieceConfig, WordPieceTokenizer

# llama.cpp's ids of a text without the special frame.
RawTokenizer = Callable[[str], list[int]]

# Whole tokens of margin between the last token that could be kept and where a long text is
# cut before tokenizing: word-level pre-tokenizers see the words near the cut differently.
# (llama.cpp's tokenizers only: embedd's WordPiece cuts where words provably end.)
_PREFIX_MARGIN_TOKENS = 16
# Texts up to this many characters per token of the limit are tokenized whole by embedd's
# WordPiece (4 KB for 256 tokens: under a millisecond), longer ones only as far as needed.
_WHOLE_TEXT_CHARS_PER_TOKEN = 16
# Unicode categories a normalisation map may turn into a space (or delete): control, format.
_BLANK = frozenset({"Cc", "Cf"})


class ModelTokenizer:
    """Tokenizing for one model, from its `TokenizerSpec`. Used by the model's coordinating
    thread alone (it keeps a memo of the last prefix)."""

    def __init__(self, spec: TokenizerSpec, raw: RawTokenizer) -> None:
        self.spec = spec
        self._raw = raw
        self.max_tokens = spec.max_tokens
        self.head = list(spec.head)
        self.tail = list(spec.tail)
        self._longest_piece = spec.longest_piece
        self._wordpiece: WordPieceTokenizer | None = None
        if spec.wordpiece is not None:
            wp = spec.wordpiece
            self._wordpiece = WordPieceTokenizer(
                wp.tokens,
                WordPieceConfig(
                    lowercase=wp.lowercase,
                    unk_token=wp.unk_token,
                    special_tokens=tuple(wp.special_tokens),
                ),
            )
        # The last usable prefix and its ids: the coordinator tokenizes that prefix right after.
        self._prefix_memo: tuple[str, list[int]] | None = None

    @property
    def frame_size(self) -> int:
        """How many special tokens wrap every input ([CLS] and [SEP] for BERT)."""
        return len(self.head) + len(self.tail)

    def _bare_ids(self, text: str) -> list[int]:
        """The ids of `text` without the special frame, from the reference's tokenizer where
        embedd has one (WordPiece), else from llama.cpp's."""
        if self._wordpiece is None:
            if self.spec.nfc:
                text = unicodedata.normalize("NFC", text)
            ids = self._raw(text)
            if self.spec.trailing_space is not None and self._ends_in_space(text):
                ids.append(self.spec.trailing_space)
            return ids
        memo = self._prefix_memo
        if memo is not None and memo[0] is text:
            return list(memo[1])
        return self._wordpiece.encode(text)

    def _ends_in_space(self, text: str) -> bool:
        """Whether `text` ends in characters that the vocabulary's own normalisation map turns
        into spaces (not into nothing): whitespace, control and format characters (the map
        may turn a zero-width space or a BOM into a space), asked of llama.cpp, which collapses
        them into the one space between two letters."""
        end = len(text)
        while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1]) in _BLANK):
            end -= 1
        tail = text[end:]
        if not tail:
            return False
        return self._raw(f"a{tail}a") == self.spec.space_probe

    def usable_prefix(self, text: str, limit: int | None = None) -> tuple[str, bool]:
        """The part of `text` that can matter for an input of at most `limit` tokens (the
        model's `max_tokens` by default), and whether that is less than all of it: a prefix
        with more tokens than fit whose tokens are the whole text's first ones. The prefix
        grows until it has them, so a text whose tokens span many characters each ([UNK]
        words, marks) is never under-read, and a long text is never read further."""
        limit = self.max_tokens if limit is None else limit
        wanted = limit - self.frame_size + 1
        if self._wordpiece is not None:
            if len(text) <= min(limit * _WHOLE_TEXT_CHARS_PER_TOKEN, MAX_SLICE):
                # Cheap enough whole, and then an over-long input's error gives its exact count.
                end, ids = len(text), self._wordpiece.encode(text)
            else:
                end, ids = self._wordpiece.grow_prefix(text, wanted)
            prefix = text if end == len(text) else text[:end]
            self._prefix_memo = (prefix, ids)
            return prefix, prefix is not text
        # llama.cpp's tokenizers: cut a margin of whole tokens beyond the last one that could
        # be kept, so the kept tokens are the whole text's; grow the cut while it has too few.
        budget = (limit + _PREFIX_MARGIN_TOKENS) * self._longest_piece
        if len(text) <= budget // 4:
            return text, False
        data = text.encode("utf-8", "surrogatepass")
        while True:
            if len(data) <= budget:
                return text, False
            prefix = data[:budget].decode("utf-8", "ignore")
            if len(self._bare_ids(prefix)) >= wanted + _PREFIX_MARGIN_TOKENS:
                return prefix, True
            budget *= 2

    def chunk(self, text: str, *, max_tokens: int, overlap: int = 0) -> Iterator[TextPiece]:
        """`text` in chunks of at most `max_tokens` tokens, special frame included (a
        generator: the coordinator consumes it a slice at a time)."""
        budget = max_tokens - self.frame_size
        if budget < 1:
            raise ValueError(f"max_tokens {max_tokens} leaves no room for text")

        def count(piece: str) -> int:
            return len(self._bare_ids(piece))

        return iter_chunks(
            text, count, budget, overlap=overlap, chars_per_token=self._longest_piece
        )

    def bare(self, text: str) -> list[int]:
        """`text`'s ids without any special tokens (a query or document of a pair)."""
        return self._bare_ids(text)

    def pair(self, query: list[int], document: list[int]) -> list[int]:
        """A cross-encoder's input: the bare ids of a query and a document in the model's
        pair frame (`PairFrame`)."""
        frame = self.spec.pair
        return frame.head + query + frame.middle + document + frame.tail

    def pieces(self, text: str) -> list[TokenPiece] | None:
        """`tokenize(text)`'s tokens, each with its vocabulary text (a special token's) or
        the characters of `text` it stands for and their [start, end) span in UTF-8 bytes.
        Known for the vocabularies embedd tokenizes itself (WordPiece); None for llama.cpp's."""
        wp = self._wordpiece
        spans = wp.encode_with_spans(text) if wp is not None else None
        if wp is None or spans is None:
            return None
        at = [0]  # each character offset's byte offset
        for ch in text:
            at.append(at[-1] + len(ch.encode("utf-8", "surrogatepass")))
        frame = [TokenPiece(i, wp.tokens[i], True, None, None) for i in self.head]
        body = [
            TokenPiece(i, wp.tokens[i] if sp else text[start:end], sp, at[start], at[end])
            for i, start, end, sp in spans
        ]
        tail = [TokenPiece(i, wp.tokens[i], True, None, None) for i in self.tail]
        return frame + body + tail

    def tokenize(self, text: str, *, truncate_to: int | None = None) -> tuple[list[int], bool]:
        """Token ids with the special tokens; cut to `truncate_to` tokens keeping them."""
        bare = self._bare_ids(text)
        n_special = self.frame_size
        truncated = False
        if truncate_to is not None and len(bare) + n_special > truncate_to:
            bare = bare[: truncate_to - n_special]
            truncated = True
        return self.head + bare + self.tail, truncated
