"""One loaded GGUF embedding model, driven through llama.cpp's C API: its weights and vocabulary
(`Model`, loaded once) and the llama contexts that compute with them (`Context`, one per
replica: llama.cpp lets many contexts share one model's weights, each adding only its own
compute buffers).

Only a model process imports this module (`runner.py`): the daemon never loads llama.cpp. There
each `Context` is used by exactly the one replica thread that created it (llama.cpp contexts
are not thread-safe). The C API is used directly rather than
`llama_cpp.Llama` because `Llama.embed` truncates by cutting the token list (dropping the final
SEP, which moves vectors away from the reference), and because `Llama(verbose=False)` redirects
the process's stdout/stderr file descriptors while loading, which would swallow the daemon's own
log lines written by other threads.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
import numpy.typing as npt

from .chunking import TextPiece
from .pipe import ModelInfo, PairFrame, TokenizerSpec, WordPieceSpec
from .tokenizer import TOKENIZER_VERSION, vocabulary_from_gguf
from .tokens import ModelTokenizer

_llama_log = logging.getLogger("embedd.llama")


def _keeping_the_gil(name: str) -> Any:
    """llama.cpp's function `name`, called without releasing the GIL.

    ctypes releases the GIL around every foreign call and takes it back after; for calls that
    return in microseconds (reading a pooled vector, clearing the memory) taking it back is the
    cost: behind a busy event loop each one waited for Python's switch interval (5 ms), several
    times per batch. Only `llama_decode`, which computes, lets the GIL go.
    """
    cdll = lc.llama_cpp._lib
    fn = getattr(ctypes.PyDLL(cdll._name, handle=cdll._handle), name)
    original = getattr(lc, name)
    fn.argtypes, fn.restype = original.argtypes, original.restype
    return fn


_get_embeddings_seq = _keeping_the_gil("llama_get_embeddings_seq")
_memory_clear = _keeping_the_gil("llama_memory_clear")

POOLING_BY_NAME = {
    "none": lc.LLAMA_POOLING_TYPE_NONE,
    "mean": lc.LLAMA_POOLING_TYPE_MEAN,
    "cls": lc.LLAMA_POOLING_TYPE_CLS,
    "last": lc.LLAMA_POOLING_TYPE_LAST,
    "rank": lc.LLAMA_POOLING_TYPE_RANK,
}
POOLING_NAME = {v: k for k, v in POOLING_BY_NAME.items()}
# llama_ftype values by name ("MOSTLY_Q8_0" -> "Q8_0"), for the model card's quantization.
QUANTIZATION_NAME = {
    getattr(lc, name): name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_")
    for name in dir(lc)
    if name.startswith("LLAMA_FTYPE_") and isinstance(getattr(lc, name), int)
}
# Architectures whose attention is bidirectional unless the GGUF says otherwise (llama.cpp sets
# `causal_attn = false` for these); any other architecture is causal unless `ARCH.attention.
# causal` is false in the file.
NON_CAUSAL_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "jina-bert-v3", "t5encoder",
     "gemma-embedding", "modern-bert", "neo-bert", "eurobert"}
)  # fmt: skip
# n_gpu_layers meaning "every layer" (llama.cpp clamps it to the model's layer count).
ALL_LAYERS = 999


def gpu_layers_for(configured: int | None, *, supports_gpu: bool) -> int:
    """Layers to offload: the user's number, else all of them when llama.cpp was built with GPU
    offload (CUDA, Metal, Vulkan...), else none."""
    if configured is not None:
        return configured
    return ALL_LAYERS if supports_gpu else 0


def model_params(gpu_layers: int, *, repack: bool = True) -> Any:
    """llama.cpp's model parameters as embedd sets them (separate so a test can read them)."""
    mparams = lc.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    # Extra buffer types hold weights repacked for the CPU's matrix instructions. On CPUs with
    # AMX, llama.cpp's repacked path for quantized weights (q8_0, q4) dies with SIGILL; without
    # it (llama-server's --no-repack) the same file computes the reference's vectors. The
    # canary (`canary.py`) decides, per file, build and CPU.
    mparams.use_extra_bufts = repack
    # Read the weights into memory rather than mapping the file: a mapped file that is
    # overwritten in place (`cp new.gguf model.gguf`) kills the process with SIGBUS on the
    # next page it touches. The cost is the page cache's sharing, nothing else.
    mparams.load_mode = lc.LLAMA_LOAD_MODE_NONE
    return mparams


# Byte-level BPE pre-tokenizers (`tokenizer.ggml.pre`) whose reference tokenizer composes the
# text to NFC first, which llama.cpp skips: Qwen2/Qwen3's tokenizer.json declares an NFC
# normalizer. Measured on a byte-level vocabulary trained here on faker text: 12 % of Hindi and
# Tamil texts tokenized differently from the reference without it, none with it.
_NFC_PRE_TOKENIZERS = frozenset({"qwen2"})
# SentencePiece Unigram (UGM) vocabularies that collapse whitespace (XLM-RoBERTa's: multilingual-
# e5, bge-m3): their reference (Hugging Face's Precompiled map, " {2,}" -> " ", Metaspace) keeps
# whitespace at the end of a text as one last word-start token, which llama.cpp (like
# SentencePiece itself) drops. Measured on a Unigram vocabulary trained here on faker text:
# every Thai text (faker ends them with a space) differed from the reference without it.
_TRAILING_SPACE_PIECE = "\u2581"
# Token attributes that make a token's text a literal special token (llama.h llama_token_attr).
_LITERAL_ATTRS = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_USER_DEFINED
# What the vocabulary's special roles are called in the GGUF (gguf's constants spell
# "seperator" so).
_SPECIAL_ID_KEYS = (
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.cls_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.mask_token_id",
)


class ModelLoadError(Exception):
    """The file cannot be served as an embedding model; the message says why."""


class DecodeError(Exception):
    """llama.cpp refused a batch."""


# --- llama.cpp's log, routed into Python logging -------------------------------------------

_log_lock = threading.Lock()
_log_installed = False
_log_partial: list[str] = []
# ggml_log_level (ggml.h): NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continues the
# previous line). Its warnings are about GGUF metadata quirks (e.g. BERT's "special_eos_id is
# not in special_eog_ids") that an operator cannot act on, so only errors show by default;
# `--verbose` shows everything.
_LEVELS = {0: logging.DEBUG, 1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.ERROR}
_last_level = logging.DEBUG


def _on_llama_log(level: int, text: bytes | None, _user: Any) -> None:
    global _last_level
    if text is None:
        return
    if level != 5:
        _last_level = _LEVELS.get(level, logging.DEBUG)
    if not _llama_log.isEnabledFor(_last_level):
        return
    msg = text.decode("utf-8", "replace")
    _log_partial.append(msg)
    if msg.endswith("\n"):
        line = "".join(_log_partial).rstrip()
        _log_partial.clear()
        if line:
            _llama_log.log(_last_level, "%s", line)


# Kept referenced for the process's lifetime: llama.cpp holds the raw function pointer.
_LOG_CALLBACK = lc.llama_log_callback(_on_llama_log)


def install_llama_log() -> None:
    global _log_installed
    with _log_lock:
        if not _log_installed:
            lc.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _log_installed = True


# --- the model ------------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise ModelLoadError(f"not a GGUF file (bad magic {magic!r}): {path}")


class Model:
    """A GGUF model's weights and vocabulary, the limits its contexts share, and what the
    daemon needs to tokenize for it (`tokenizer_spec`)."""

    def __init__(
        self,
        path: Path,
        *,
        batch_tokens: int,
        max_tokens: int | None,
        gpu_layers: int | None = None,
        dim: int | None = None,
        repack: bool = True,
    ) -> None:
        install_llama_log()
        _check_file(path)
        self.path = path
        self.repack = repack
        self.gpu_layers = gpu_layers_for(
            gpu_layers, supports_gpu=bool(lc.llama_supports_gpu_offload())
        )
        model = lc.llama_model_load_from_file(
            str(path).encode(), model_params(self.gpu_layers, repack=repack)
        )
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {path} (unsupported or corrupt GGUF)")
        self._model = model
        try:
            self.card = self._card()
            actual = int(lc.llama_model_n_embd(model))
            if dim is not None and dim != actual:
                raise ModelLoadError(
                    f"{path} makes {actual}-dimensional vectors, but the config expects dim = "
                    f"{dim} (a vector store sized for {dim} would be corrupted)"
                )
            self._init_vocab(batch_tokens, max_tokens)
        except BaseException:
            self.close()
            raise

    def _init_vocab(self, batch_tokens: int, max_tokens: int | None) -> None:
        model = self._model
        self._vocab = lc.llama_model_get_vocab(model)
        self.dim = int(lc.llama_model_n_embd(model))
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(model))
        if max_tokens is None:
            max_tokens = self.n_ctx_train
        if max_tokens > self.n_ctx_train:
            raise ModelLoadError(
                f"max_tokens {max_tokens} exceeds the model's context length {self.n_ctx_train}"
            )
        self.max_tokens = max_tokens
        # A non-causal model must see each input in one ubatch (llama.cpp asserts
        # n_ubatch >= n_tokens), so the batch is never smaller than the longest input.
        self.batch_tokens = max(batch_tokens, max_tokens)
        self.max_seqs = int(min(self.batch_tokens, lc.llama_max_parallel_sequences(), 64))
        self.memory = int(lc.llama_model_size(model))
        self._head, self._tail = self._special_frame()
        if len(self._head) + len(self._tail) >= max_tokens:
            raise ModelLoadError(f"max_tokens {max_tokens} leaves no room for text")
        self.classifier_labels = self._classifier_labels()
        self.tokenizer_spec = TokenizerSpec(
            head=self._head,
            tail=self._tail,
            max_tokens=max_tokens,
            # No token spans more bytes than this: a text longer than max_tokens times it
            # cannot fit, so only that much of it is ever tokenized.
            longest_piece=self._longest_token_bytes(),
            nfc=self._composes_nfc(),
            trailing_space=self._trailing_space_token(),
            space_probe=self.tokenize_bare("a a"),
            wordpiece=self._wordpiece_spec(),
            pair=self._pair_frame(),
        )
        try:
            self.tokenizer = ModelTokenizer(self.tokenizer_spec, self.tokenize_bare)
        except ValueError as exc:
            raise ModelLoadError(f"unusable WordPiece vocabulary: {exc}") from exc

    def info(self, pooling: str, outputs: int) -> ModelInfo:
        """What `models` and the coordinator are told, once a context has said how it pools
        (and so whether the model embeds or reranks) and how many floats it returns per
        sequence."""
        task = "rerank" if pooling == "rank" else "embed"
        card = {**self.card, "task": task}
        if task == "rerank":
            card["pair_template"] = self._pair_template()
            card["classifier_labels"] = self.classifier_labels
        return ModelInfo(
            dim=self.dim,
            pooling=pooling,
            n_ctx_train=self.n_ctx_train,
            memory=self.memory,
            max_tokens=self.max_tokens,
            batch_tokens=self.batch_tokens,
            max_seqs=self.max_seqs,
            card=card,
            tokenizer=self.card["tokenizer"],
            task=task,
            outputs=outputs,
        )

    def new_context(self, *, threads: int, pooling: str | None) -> Context:
        """A context over these weights, for the calling thread to own."""
        return Context(self, threads=threads, pooling=self.pooling_for(pooling))

    def pooling_for(self, configured: str | None) -> str | None:
        """The pooling a context gets: the config's, else the file's own (llama.cpp reads it),
        else rank for a file with a classification head. llama.cpp's converter writes a
        cross-encoder's head (`classifier.output_labels`) but no pooling type, which is why
        llama-server needs `--reranking` for them; the head says what the model is."""
        if configured is not None:
            return configured
        declared = self._meta(f"{self.card['architecture']}.pooling_type")
        if declared is None:
            return "rank" if self.classifier_labels else None
        # Named here (rather than left to llama.cpp) so that the context knows it reranks.
        rank = declared.isdigit() and int(declared) == lc.LLAMA_POOLING_TYPE_RANK
        return "rank" if rank else None

    def _classifier_labels(self) -> list[str]:
        """The labels of the file's classification head (`ARCH.classifier.output_labels`),
        none when it has no head."""
        labels = []
        for i in range(int(lc.llama_model_n_cls_out(self._model))):
            label = lc.llama_model_cls_label(self._model, i)
            if label is None:
                return []
            labels.append(label.decode("utf-8", "replace"))
        return labels

    def _pair_frame(self) -> PairFrame:
        """The special tokens around a query/document pair, by llama-server's rule
        (`format_prompt_rerank`): BOS if the vocabulary adds one, the query, EOS (else SEP) if
        it adds one, SEP if it adds one, the document, EOS again. With the flags llama.cpp's
        converter writes, that is exactly the pair each reference tokenizer builds: BERT's
        `[CLS] q [SEP] d [SEP]`, XLM-RoBERTa's `<s> q </s></s> d </s>`."""
        vocab = self._vocab
        eos = int(lc.llama_vocab_eos(vocab))
        if eos < 0:
            eos = int(lc.llama_vocab_sep(vocab))
        head = [int(lc.llama_vocab_bos(vocab))] if lc.llama_vocab_get_add_bos(vocab) else []
        middle = [eos] if lc.llama_vocab_get_add_eos(vocab) else []
        if lc.llama_vocab_get_add_sep(vocab):
            middle.append(int(lc.llama_vocab_sep(vocab)))
        tail = [eos] if lc.llama_vocab_get_add_eos(vocab) else []

        def known(ids: list[int]) -> list[int]:
            return [i for i in ids if i >= 0]  # a role the vocabulary lacks is -1

        return PairFrame(head=known(head), middle=known(middle), tail=known(tail))

    def _pair_template(self) -> str:
        """The pair frame as text, for the model card."""
        pair = self.tokenizer_spec.pair
        vocab = self.vocabulary()

        def names(ids: list[int]) -> str:
            return "".join(vocab[i] for i in ids)

        return f"{names(pair.head)}{{query}}{names(pair.middle)}{{document}}{names(pair.tail)}"

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1024)
        n = lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _card(self) -> dict[str, Any]:
        """What the GGUF says about itself (`models` shows it)."""
        arch = self._meta("general.architecture") or "unknown"
        causal_key = self._meta(f"{arch}.attention.causal")
        causal = (
            causal_key.lower() == "true"
            if causal_key is not None
            else arch not in NON_CAUSAL_ARCHITECTURES
        )
        file_type = self._meta("general.file_type")
        quant = (
            QUANTIZATION_NAME.get(int(file_type), file_type)
            if file_type and file_type.isdigit()
            else None
        )
        supports_gpu = bool(lc.llama_supports_gpu_offload())
        return {
            "architecture": arch,
            # `name` in `models` is the configured name; the file's own is `model_name`.
            "model_name": self._meta("general.name"),
            "license": self._meta("general.license"),
            "source": self._meta("general.source.url") or self._meta("general.url"),
            "quantization": quant,
            "causal": causal,
            "layers": int(lc.llama_model_n_layer(self._model)),
            "gpu_layers": self.gpu_layers if supports_gpu else 0,
            "runs_on": "gpu" if supports_gpu and self.gpu_layers > 0 else "cpu",
            "tokenizer": self._tokenizer_version(),
        }

    def _composes_nfc(self) -> bool:
        return self._meta("tokenizer.ggml.pre") in _NFC_PRE_TOKENIZERS

    def _keeps_trailing_space(self) -> bool:
        vocab_type = lc.llama_vocab_type(lc.llama_model_get_vocab(self._model))
        collapses = self._meta("tokenizer.ggml.remove_extra_whitespaces")
        return vocab_type == lc.LLAMA_VOCAB_TYPE_UGM and (collapses or "").lower() == "true"

    def _tokenizer_version(self) -> str:
        """Which tokenizer makes this model's ids (cache keys and index fingerprints)."""
        if lc.llama_vocab_type(lc.llama_model_get_vocab(self._model)) == lc.LLAMA_VOCAB_TYPE_WPM:
            return TOKENIZER_VERSION
        version = f"llama.cpp-{lc.__version__}"
        if self._composes_nfc():
            version += "+nfc"
        if self._keeps_trailing_space():
            version += "+trailing-space"
        return version

    def _trailing_space_token(self) -> int | None:
        """The id the reference gives whitespace ending a text, where llama.cpp drops it (see
        _TRAILING_SPACE_PIECE): the word-start piece, else the unknown token."""
        if not self._keeps_trailing_space():
            return None
        for i, token in enumerate(self.vocabulary()):
            if token == _TRAILING_SPACE_PIECE:
                return i
        unk = self._meta("tokenizer.ggml.unknown_token_id")
        return int(unk) if unk is not None and unk.isdigit() else None

    def vocabulary(self) -> list[str]:
        """Every token's text as the GGUF stores it (`tokenizer.ggml.tokens`), by id."""
        return [
            (lc.llama_vocab_get_text(self._vocab, i) or b"").decode("utf-8", "replace")
            for i in range(int(lc.llama_vocab_n_tokens(self._vocab)))
        ]

    def _literal_token_ids(self) -> set[int]:
        """Tokens that the text can name literally: control and user-defined tokens, and
        whatever the GGUF names as a special role."""
        n = int(lc.llama_vocab_n_tokens(self._vocab))
        ids = {i for i in range(n) if int(lc.llama_vocab_get_attr(self._vocab, i)) & _LITERAL_ATTRS}
        for key in _SPECIAL_ID_KEYS:
            value = self._meta(key)
            if value is not None and value.isdigit() and int(value) < n:
                ids.add(int(value))
        return ids

    def _wordpiece_spec(self) -> WordPieceSpec | None:
        """The reference's WordPiece over this model's vocabulary, for BERT vocabularies (the
        only type embedd tokenizes itself: llama.cpp's WordPiece deviates from the reference
        on accents, Hangul and long words)."""
        if lc.llama_vocab_type(self._vocab) != lc.LLAMA_VOCAB_TYPE_WPM:
            return None
        literal = self._literal_token_ids()
        tokens = vocabulary_from_gguf(self.vocabulary(), literal)
        unk = self._meta("tokenizer.ggml.unknown_token_id")
        lowercase = self._meta("tokenizer.ggml.normalizer.lowercase")
        return WordPieceSpec(
            tokens=tokens,
            # llama.cpp lower-cases every BERT vocabulary that does not say otherwise.
            lowercase=lowercase is None or lowercase.lower() == "true",
            unk_token=tokens[int(unk)] if unk is not None and unk.isdigit() else "[UNK]",
            special_tokens=[tokens[i] for i in sorted(literal)],
        )

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the model wraps every input in (BERT: [CLS] ... [SEP]).

        Found by tokenizing a probe with and without them, so truncation can cut the word pieces
        and keep the frame, whatever the vocabulary type.
        """
        full = self._tokenize_raw("hello", add_special=True)
        bare = self._tokenize_raw("hello", add_special=False)
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                return full[:i], full[i + len(bare) :]
        raise ModelLoadError("cannot find how the tokenizer adds special tokens")

    def _longest_token_bytes(self) -> int:
        buf = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(int(lc.llama_vocab_n_tokens(self._vocab))):
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            longest = max(longest, abs(int(n)))
        return longest

    # --- tokenizing -------------------------------------------------------------------------

    def _tokenize_raw(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        while True:
            buf = (lc.llama_token * n_max)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, False)
            if n >= 0:
                return list(buf[:n])
            n_max = -n

    def tokenize_bare(self, text: str) -> list[int]:
        """llama.cpp's ids of `text` without the special frame (what the daemon asks the model
        process for, for vocabularies embedd does not tokenize itself)."""
        return self._tokenize_raw(text, add_special=False)

    # In-process tokenizing, for tests that drive llama.cpp directly; the daemon tokenizes
    # with its own ModelTokenizer over the same spec.

    @property
    def frame_size(self) -> int:
        return self.tokenizer.frame_size

    def usable_prefix(self, text: str) -> tuple[str, bool]:
        return self.tokenizer.usable_prefix(text)

    def chunk(self, text: str, *, max_tokens: int, overlap: int = 0) -> Iterator[TextPiece]:
        return self.tokenizer.chunk(text, max_tokens=max_tokens, overlap=overlap)

    def tokenize(self, text: str, *, truncate_to: int | None = None) -> tuple[list[int], bool]:
        return self.tokenizer.tokenize(text, truncate_to=truncate_to)

    def close(self) -> None:
        """Free the weights; every context over them must be closed first."""
        if self._model is not None:
            lc.llama_model_free(self._model)
            self._model = None


class Context:
    """One llama context over a `Model`'s weights: its compute buffers, batch and threads."""

    def __init__(self, model: Model, *, threads: int, pooling: str | None) -> None:
        self.model = model
        self._ctx: Any = None
        self._batch: Any = None
        batch_tokens = model.batch_tokens
        max_seqs = model.max_seqs
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = batch_tokens
        cparams.n_batch = batch_tokens
        cparams.n_ubatch = batch_tokens
        cparams.n_seq_max = max_seqs
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self._threads = threads
        cparams.embeddings = True
        cparams.kv_unified = True
        # Measured here: with flash attention, packing several sequences in one ubatch helps;
        # without it, the masked attention over the whole ubatch makes packing slower. A
        # reranker's context goes without: llama.cpp's CPU flash attention computes in half
        # precision, which raised the largest score error against the checkpoints' forward
        # pass (tests/data/rerankers) from 4.1e-4 to 6.6e-4 (BERT) and from 2.4e-4 to 5.3e-4
        # (XLM-RoBERTa), and a score, unlike a vector, is read to its decimals.
        rank = pooling == "rank"
        cparams.flash_attn_type = (
            lc.LLAMA_FLASH_ATTN_TYPE_DISABLED if rank else lc.LLAMA_FLASH_ATTN_TYPE_ENABLED
        )
        cparams.pooling_type = (
            POOLING_BY_NAME[pooling] if pooling is not None else lc.LLAMA_POOLING_TYPE_UNSPECIFIED
        )
        ctx = lc.llama_init_from_model(model._model, cparams)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {model.path}")
        self._ctx = ctx
        try:
            pooling_type = int(lc.llama_pooling_type(ctx))
            if pooling_type in (lc.LLAMA_POOLING_TYPE_NONE, lc.LLAMA_POOLING_TYPE_UNSPECIFIED):
                raise ModelLoadError(
                    f"not an embedding model: {model.path} declares no pooling type "
                    "(set `pooling` for it in the config if it really is one)"
                )
            rank = pooling_type == lc.LLAMA_POOLING_TYPE_RANK
            if rank and not model.classifier_labels:
                # Without a head, llama.cpp's rank output is the first float of [CLS]'s hidden
                # state: a number, never a score.
                raise ModelLoadError(
                    f"pooling 'rank' needs a cross-encoder's classification head "
                    f"(`classifier.output_labels` in the GGUF), and {model.path} has none"
                )
            if rank and lc.llama_get_causal_attn(ctx):
                # Qwen3-Reranker and its kind: llama.cpp scores them from the last token through
                # a yes/no head and a chat template of its own (`tokenizer.chat_template.rerank`),
                # which embedd does not fill in.
                raise ModelLoadError(
                    f"{model.path} is a causal reranker (a Qwen3-Reranker-style model); embedd "
                    "serves encoder cross-encoders (BERT, XLM-RoBERTa) only"
                )
        except BaseException:
            self.close()
            raise
        self.pooling = POOLING_NAME.get(pooling_type, str(pooling_type))
        # A reranker's sequence output is its classifier's scores, not a vector.
        self.outputs = int(lc.llama_model_n_cls_out(model._model)) if rank else model.dim
        self._dim = self.outputs
        self._max_seqs = max_seqs
        self._batch = lc.llama_batch_init(batch_tokens, 0, max_seqs)
        self._cap = batch_tokens
        self._tok = np.ctypeslib.as_array(self._batch.token, shape=(batch_tokens,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(batch_tokens,))
        self._nseq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(batch_tokens,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(batch_tokens,))
        self._seq_ptrs = [self._batch.seq_id[i] for i in range(batch_tokens)]
        self._memory = lc.llama_get_memory(ctx)

    def set_threads(self, n: int) -> None:
        """Compute threads for the next decodes (llama.cpp reads them per graph compute)."""
        if n != self._threads:
            lc.llama_set_n_threads(self._ctx, n, n)
            self._threads = n

    # --- computing ---------------------------------------------------------------------------

    def embed(self, seqs: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        """Pooled, unnormalized vectors of sequences that together fit in one batch."""
        n_total = sum(len(s) for s in seqs)
        if n_total > self._cap or len(seqs) > self._max_seqs:
            raise ValueError(
                f"batch of {len(seqs)} sequences / {n_total} tokens exceeds "
                f"{self._max_seqs} / {self._cap}"
            )
        n = 0
        for seq_id, toks in enumerate(seqs):
            k = len(toks)
            self._tok[n : n + k] = toks
            self._pos[n : n + k] = np.arange(k)
            for i in range(n, n + k):
                self._seq_ptrs[i][0] = seq_id
            n += k
        self._nseq[:n] = 1
        self._logits[:n] = 1
        self._batch.n_tokens = n
        if self._memory:
            _memory_clear(self._memory, True)
        rc = lc.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise DecodeError(f"llama_decode returned {rc}")
        dim = self._dim
        out = np.empty((len(seqs), dim), dtype=np.float32)
        for seq_id in range(len(seqs)):
            ptr = _get_embeddings_seq(self._ctx, seq_id)
            if not ptr:
                raise DecodeError(f"llama.cpp returned no embedding for sequence {seq_id}")
            out[seq_id] = np.ctypeslib.as_array(ptr, shape=(dim,))
        return out

    def close(self) -> None:
        if self._batch is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            lc.llama_free(self._ctx)
            self._ctx = None
