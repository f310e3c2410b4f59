"""Small GGUF models written at test time with the `gguf` package: random weights, the real
tokenizer metadata of the bundled model (no model hub is reachable here). A few hundred KB of
weights each, made in well under a second."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tests.conftest import BUNDLED


def _tokenizer(reader: gguf.GGUFReader) -> dict[str, Any]:
    def value(key: str) -> Any:
        field = reader.fields[key]
        return field.parts[field.data[0]][0]

    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    return {
        "tokens": [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data],
        "types": [int(types.parts[i][0]) for i in types.data],
        "cls": int(value("tokenizer.ggml.bos_token_id")),
        "sep": int(value("tokenizer.ggml.seperator_token_id")),
        "unk": int(value("tokenizer.ggml.unknown_token_id")),
        "pad": int(value("tokenizer.ggml.padding_token_id")),
    }


def write_bert(
    path: Path,
    *,
    pooling: int,
    arch: str = "bert",
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
) -> Path:
    """A BERT-family encoder (WordPiece vocabulary) with the given llama.cpp pooling type (1
    mean, 2 cls): `bert` (learned positions), `nomic-bert` (rotary positions, fused QKV,
    SwiGLU) or `jina-bert-v2` (ALiBi, gated FFN)."""
    tok = _tokenizer(gguf.GGUFReader(BUNDLED))
    n_vocab, n_ff, n_ctx = len(tok["tokens"]), 2 * n_embd, 512
    rng = np.random.default_rng(1234)

    def w(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch} pooling {pooling}")
    if arch == "nomic-bert":
        writer.add_rope_freq_base(1000.0)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType(pooling))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_type_count(2)
    writer.add_bos_token_id(tok["cls"])
    writer.add_sep_token_id(tok["sep"])
    writer.add_eos_token_id(tok["sep"])
    writer.add_unk_token_id(tok["unk"])
    writer.add_pad_token_id(tok["pad"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    ones = np.ones(n_embd, np.float32)
    zeros = np.zeros(n_embd, np.float32)
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    writer.add_tensor("token_types.weight", w(2, n_embd))
    if arch == "bert":
        writer.add_tensor("position_embd.weight", w(n_ctx, n_embd))
    writer.add_tensor("token_embd_norm.weight", ones)
    writer.add_tensor("token_embd_norm.bias", zeros)
    for i in range(n_layer):
        if arch == "nomic-bert":
            writer.add_tensor(f"blk.{i}.attn_qkv.weight", w(3 * n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.attn_output.weight", w(n_embd, n_embd))
        else:
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                writer.add_tensor(f"blk.{i}.{name}.weight", w(n_embd, n_embd))
                writer.add_tensor(f"blk.{i}.{name}.bias", w(n_embd))
        writer.add_tensor(f"blk.{i}.attn_output_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_output_norm.bias", zeros)
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(n_ff, n_embd))
        if arch == "bert":
            writer.add_tensor(f"blk.{i}.ffn_up.bias", w(n_ff))
        else:
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, n_ff))
        if arch != "nomic-bert":
            writer.add_tensor(f"blk.{i}.ffn_down.bias", w(n_embd))
        writer.add_tensor(f"blk.{i}.layer_output_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.layer_output_norm.bias", zeros)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    """A small byte-level BPE vocabulary (GPT-2's byte-to-unicode alphabet plus a few merges)
    and its merges: what a Qwen-family tokenizer looks like, in miniature."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    printable += list(range(0xAE, 0xFF + 1))
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    tokens = [mapping[b] for b in range(256)]
    space = mapping[ord(" ")]
    merges = []
    for word in ("he", "ll", "hell", "hello", "wo", "or", "ld", "world", "em", "be", "ed"):
        left, right = word[: len(word) // 2], word[len(word) // 2 :]
        if left in tokens and right in tokens and word not in tokens:
            merges.append(f"{left} {right}")
            tokens.append(word)
    merges.append(f"{space} w")
    tokens.append(space + "w")
    return tokens, merges


def write_qwen3(
    path: Path,
    *,
    vocab: Vocabulary | None = None,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    reranker: bool = False,
    classifier: bool = True,
) -> Path:
    """A causal Qwen3 with last-token pooling and EOS appended, as Qwen3-Embedding is; by
    default over a handful of merges, or over `vocab` (see `byte_level_vocabulary`). With
    `reranker`, rank pooling and (with `classifier`) a yes/no head instead, as llama.cpp's
    converter writes Qwen3-Reranker."""
    if vocab is None:
        tokens, merges = _byte_level_vocab()
    else:
        tokens, merges = list(vocab.tokens), list(vocab.merges or ())
    eos = len(tokens)
    tokens.append("<|endoftext|>")
    n_vocab, n_ff, head = len(tokens), 2 * n_embd, n_embd // n_head
    rng = np.random.default_rng(4321)

    def w(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_name("tiny qwen3 last-token")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_pooling_type(gguf.PoolingType.RANK if reranker else gguf.PoolingType.LAST)
    if reranker and classifier:
        writer.add_classifier_output_labels(["yes", "no"])
        writer.add_tensor("cls.output.weight", w(2, n_embd))
    writer.add_file_type(0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (n_vocab - 1) + [3])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(eos)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(n_head * head, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(n_head * head, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(n_head * head, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(n_embd, n_head * head))
        writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head, np.float32))
        writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    """A small SentencePiece vocabulary (Gemma's layout: pad, eos, bos, unk, byte fallback,
    then pieces with scores), the kind Gemma and T5-family models carry."""
    tokens, types, scores = ["<pad>", "<eos>", "<bos>", "<unk>"], [3, 3, 3, 2], [0.0] * 4
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)
        scores.append(0.0)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["\u2581", "\u2581hello", "\u2581world", "\u2581the", *letters]
    pieces += ["\u2581" + c for c in letters]
    for i, piece in enumerate(dict.fromkeys(pieces)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    return tokens, types, scores


def write_gemma_embedding(
    path: Path, *, vocab: Vocabulary | None = None, n_embd: int = 32, n_layer: int = 6
) -> Path:
    """An EmbeddingGemma-like model: bidirectional, sliding-window attention in five of every six
    layers (with fewer than six layers none is global, and llama.cpp 0.3.36 then aborts in
    decode), dense projections after pooling, a SentencePiece vocabulary (a hand-made one by
    default, or `vocab`, see `sentencepiece_bpe_vocabulary`)."""
    if vocab is None:
        tokens, types, scores = _sentencepiece_vocab()
    else:
        tokens, types, scores = list(vocab.tokens), list(vocab.types), list(vocab.scores or ())
    n_head, head, n_ff = 2, 16, 2 * n_embd
    rng = np.random.default_rng(5)

    def w(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    arch = "gemma-embedding"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny gemma-embedding")
    writer.add_context_length(512)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(1)
    writer.add_key_length(head)
    writer.add_value_length(head)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(64)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(0)
    for key in ("dense_2_feat_in", "dense_3_feat_out"):
        writer.add_uint32(f"{arch}.{key}", n_embd)
    for key in ("dense_2_feat_out", "dense_3_feat_in"):
        writer.add_uint32(f"{arch}.{key}", 4 * n_embd)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    # Gemma's SentencePiece model adds no dummy prefix, and llama.cpp's converter says so.
    writer.add_add_space_prefix(False)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    ones = np.ones(n_embd, np.float32)
    writer.add_tensor("token_embd.weight", w(len(tokens), n_embd))
    writer.add_tensor("output_norm.weight", ones)
    writer.add_tensor("dense_2.weight", w(4 * n_embd, n_embd))
    writer.add_tensor("dense_3.weight", w(n_embd, 4 * n_embd))
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_q.weight", w(n_head * head, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", w(head, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", w(head, n_embd))
        writer.add_tensor(f"blk.{i}.attn_q_norm.weight", np.ones(head, np.float32))
        writer.add_tensor(f"blk.{i}.attn_k_norm.weight", np.ones(head, np.float32))
        writer.add_tensor(f"blk.{i}.attn_output.weight", w(n_embd, n_head * head))
        writer.add_tensor(f"blk.{i}.post_attention_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, n_ff))
        writer.add_tensor(f"blk.{i}.post_ffw_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- vocabularies trained on text, for the tokenizer comparisons ----------------------------


@dataclass(frozen=True)
class Vocabulary:
    """A vocabulary as a GGUF stores it: token strings and types (gguf.TokenType), and per
    type the scores (SentencePiece), the merges (byte-level BPE) or the normalisation map."""

    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    charsmap: bytes | None = None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message, one level deep."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i : i + n], i + n
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i : i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield key >> 3, value


def _charsmap(model_proto: bytes) -> bytes:
    """The precompiled normalisation map of a SentencePiece model (ModelProto field 3,
    normalizer_spec; its field 2, precompiled_charsmap)."""
    for field, spec in _proto_fields(model_proto):
        if field == 3 and isinstance(spec, bytes):
            for inner, charsmap in _proto_fields(spec):
                if inner == 2 and isinstance(charsmap, bytes):
                    return charsmap
    raise ValueError("no precompiled_charsmap in the SentencePiece model")


def _train_sentencepiece(corpus: Sequence[str], **options: Any) -> Any:
    """A SentencePiece model trained on `corpus` (one thread, quiet), loaded."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(t.split("\n")) for t in corpus]),
        model_writer=model,
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        **options,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def unigram_vocabulary(corpus: Sequence[str], size: int = 3000) -> Vocabulary:
    """An XLM-RoBERTa-style vocabulary: a SentencePiece Unigram model with the NFKC-based
    `nmt_nfkc` normalisation map (XLM-R's), realigned as fairseq and llama.cpp's converter do
    (`<s>`, `<pad>`, `</s>`, `<unk>`, the pieces, `<mask>` last)."""
    sp = _train_sentencepiece(
        corpus, model_type="unigram", vocab_size=size, normalization_rule_name="nmt_nfkc"
    )
    n = sp.get_piece_size()
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(3, n)]
    control, unknown, normal = (
        int(gguf.TokenType.CONTROL),
        int(gguf.TokenType.UNKNOWN),
        int(gguf.TokenType.NORMAL),
    )
    return Vocabulary(
        tokens=["<s>", "<pad>", "</s>", "<unk>", *(p for p, _ in pieces), "<mask>"],
        types=[control, control, control, unknown, *([normal] * len(pieces)), control],
        scores=[0.0, 0.0, 0.0, 0.0, *(s for _, s in pieces), 0.0],
        charsmap=_charsmap(sp.serialized_model_proto()),
    )


def sentencepiece_bpe_vocabulary(corpus: Sequence[str], size: int = 3000) -> Vocabulary:
    """A Gemma-style vocabulary: a SentencePiece BPE model with byte fallback, no dummy
    prefix, no normalisation, digits split, and Gemma's ids for `<pad>`, `<eos>`, `<bos>`,
    `<unk>`."""
    sp = _train_sentencepiece(
        corpus,
        model_type="bpe",
        vocab_size=size,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
    )
    tokens, types, scores = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        kind = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        types.append(int(kind))
    return Vocabulary(tokens=tokens, types=types, scores=scores)


# Qwen2's pre-tokenizer split (its tokenizer.json; llama.cpp's `qwen2` pre-tokenizer): a
# contraction, a letter run with one leading non-letter, one digit, punctuation, line breaks,
# spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_level_pre_tokenizer() -> Any:
    """Qwen2's pre-tokenizer in Hugging Face's `tokenizers`: the split, then bytes as
    GPT-2's printable alphabet."""
    import tokenizers as tk

    return tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(QWEN2_SPLIT), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def byte_level_vocabulary(corpus: Sequence[str], size: int = 3000) -> Vocabulary:
    """A Qwen2-style byte-level BPE vocabulary (all 256 byte symbols, merges learned on NFC
    text) trained with Hugging Face's `tokenizers` (`write_qwen3` appends `<|endoftext|>`)."""
    import tokenizers as tk

    model = tk.Tokenizer(tk.models.BPE())
    model.normalizer = tk.normalizers.NFC()
    model.pre_tokenizer = byte_level_pre_tokenizer()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=size,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(corpus, trainer)
    saved = json.loads(model.to_str())["model"]
    vocab: dict[str, int] = saved["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = [m if isinstance(m, str) else " ".join(m) for m in saved["merges"]]
    return Vocabulary(
        tokens=tokens, types=[int(gguf.TokenType.NORMAL)] * len(tokens), merges=merges
    )


def write_xlm_roberta(
    path: Path,
    vocab: Vocabulary,
    *,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
) -> Path:
    """An XLM-RoBERTa-style encoder (multilingual-e5, bge-m3, paraphrase-multilingual-mpnet):
    llama.cpp's `bert` architecture with a SentencePiece Unigram vocabulary (`t5` in GGUF
    terms, UGM in llama.cpp's) and its precompiled normalisation map, mean pooling, written
    as llama.cpp's converter writes such a model (`<s>` ... `</s>`, one token type)."""
    assert vocab.scores is not None and vocab.charsmap is not None
    n_vocab, n_ff, n_ctx = len(vocab.tokens), 2 * n_embd, 512
    rng = np.random.default_rng(2718)

    def w(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_name("tiny xlm-roberta unigram")
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_layer_norm_eps(1e-5)
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(0)
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_add_space_prefix(True)
    writer.add_token_type_count(1)
    writer.add_remove_extra_whitespaces(True)
    writer.add_precompiled_charsmap(vocab.charsmap)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    writer.add_sep_token_id(2)
    writer.add_pad_token_id(1)
    writer.add_mask_token_id(n_vocab - 1)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    ones = np.ones(n_embd, np.float32)
    zeros = np.zeros(n_embd, np.float32)
    writer.add_tensor("token_embd.weight", w(n_vocab, n_embd))
    writer.add_tensor("token_types.weight", w(1, n_embd))
    writer.add_tensor("position_embd.weight", w(n_ctx, n_embd))
    writer.add_tensor("token_embd_norm.weight", ones)
    writer.add_tensor("token_embd_norm.bias", zeros)
    for i in range(n_layer):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"blk.{i}.{name}.weight", w(n_embd, n_embd))
            writer.add_tensor(f"blk.{i}.{name}.bias", w(n_embd))
        writer.add_tensor(f"blk.{i}.attn_output_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.attn_output_norm.bias", zeros)
        writer.add_tensor(f"blk.{i}.ffn_up.weight", w(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.bias", w(n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", w(n_embd, n_ff))
        writer.add_tensor(f"blk.{i}.ffn_down.bias", w(n_embd))
        writer.add_tensor(f"blk.{i}.layer_output_norm.weight", ones)
        writer.add_tensor(f"blk.{i}.layer_output_norm.bias", zeros)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
