"""What crosses the pipe between the daemon and a model process, as typed messages, and how they
are framed: bytes in, messages out, no I/O (the same shape as the wire's framing).

A model process (`runner.py`) owns everything llama.cpp: the daemon never loads the library,
so a native fault in it (SIGILL from a CPU path, an abort on an edge input, an out-of-memory
kill) ends one process the daemon restarts, not the daemon. The hand-off stays narrow and
typed: token ids and a thread count go in, float32 vectors come back as raw bytes (no
per-component encoding); the process also reports what the daemon needs to tokenize
(`TokenizerSpec`) and to describe the model (`ModelInfo`), since reading a GGUF header is
itself llama.cpp's work.

Each frame is a 4-byte big-endian length and a msgpack array whose first element names the
message.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack  # type: ignore[import-untyped]

# The largest frame either side accepts. The biggest messages are a vocabulary (a 250,000-token
# SentencePiece vocabulary packs to about 5 MB) and a text to tokenize, which the daemon has
# already bounded by its own `max_frame` (at most 1 GiB by the config's range).
MAX_PIPE_FRAME = (1 << 30) + (1 << 20)
_LENGTH = struct.Struct(">I")


class PipeError(Exception):
    """The other side sent something that is not a message: the process is not trusted again."""


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model as `models`, the cache and the coordinator see it."""

    dim: int
    pooling: str
    n_ctx_train: int
    memory: int
    max_tokens: int
    batch_tokens: int
    max_seqs: int
    # Content fingerprint of the model file (cache keys); filled in by the daemon.
    fingerprint: str = ""
    # What the file says about itself, its size and sha256 (`models`).
    card: Mapping[str, Any] = field(default_factory=dict)
    # Which tokenizer made the ids (cache keys, index fingerprints): vectors from another
    # tokenizer's ids are different vectors.
    tokenizer: str = ""
    # "embed" (a vector per text) or "rerank" (a cross-encoder: scores per query/document pair,
    # llama.cpp's rank pooling); and the floats a sequence's output holds (`dim` for an
    # embedder, the classifier's outputs for a reranker).
    task: str = "embed"
    outputs: int = 0


@dataclass(frozen=True)
class WordPieceSpec:
    """A BERT vocabulary, which the daemon tokenizes itself as the reference does."""

    tokens: list[str]
    lowercase: bool
    unk_token: str
    special_tokens: list[str]


@dataclass(frozen=True)
class PairFrame:
    """The special tokens around a query/document pair for a cross-encoder: `head`, the query's
    ids, `middle`, the document's ids, `tail`."""

    head: list[int]
    middle: list[int]
    tail: list[int]

    @property
    def size(self) -> int:
        return len(self.head) + len(self.middle) + len(self.tail)


@dataclass(frozen=True)
class TokenizerSpec:
    """What the daemon needs to turn a model's texts into token ids: the special frame, the
    longest token, the vocabulary's quirks, and, for WordPiece, the vocabulary itself. Other
    vocabulary types are tokenized by llama.cpp in the model process (`Tokenize`)."""

    head: list[int]
    tail: list[int]
    max_tokens: int
    # No token spans more UTF-8 bytes than this.
    longest_piece: int
    # Compose text to NFC first (the reference does, llama.cpp does not).
    nfc: bool
    # The id the reference gives whitespace ending a text, where llama.cpp drops it.
    trailing_space: int | None
    # llama.cpp's ids of "a a": a text between two letters that tokenizes so is a space.
    space_probe: list[int]
    wordpiece: WordPieceSpec | None = None
    pair: PairFrame = PairFrame([], [], [])


# --- daemon -> model process ------------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    """Load the weights and start the replicas' contexts (`replicas` and `threads` as the
    config says, None: automatic over `usable` cores); `repack` allows llama.cpp's extra
    buffer types (weights repacked for the CPU's matrix instructions)."""

    path: str
    batch_tokens: int
    max_tokens: int | None
    gpu_layers: int | None
    dim: int | None
    pooling: str | None
    replicas: int | None
    threads: int | None
    usable: int
    repack: bool


@dataclass(frozen=True)
class Compute:
    """One batch for one replica: sequences of token ids, packed as int32 with their lengths."""

    batch: int
    replica: int
    threads: int
    lengths: list[int]
    tokens: bytes


@dataclass(frozen=True)
class Tokenize:
    """llama.cpp's ids of `text`, without the special frame."""

    request: int
    text: str


# --- model process -> daemon ------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Sent at start, before any model is loaded: which llama.cpp build runs (the canary's
    verdicts are kept per build)."""

    pid: int
    build: str
    system_info: str


@dataclass(frozen=True)
class Loaded:
    info: ModelInfo
    tokenizer: TokenizerSpec
    # Contexts started (one per replica: on a GPU one, else as `threads.replicas_for` says).
    replicas: int


@dataclass(frozen=True)
class LoadFailed:
    reason: str


@dataclass(frozen=True)
class Computed:
    """A batch's pooled, unnormalised vectors (float32, little-endian, row-major), and the
    seconds the decode took inside the process."""

    batch: int
    vectors: bytes
    seconds: float


@dataclass(frozen=True)
class ComputeFailed:
    batch: int
    reason: str


@dataclass(frozen=True)
class Tokenized:
    request: int
    ids: bytes


@dataclass(frozen=True)
class LogLine:
    """A log record of the process (llama.cpp's own lines among them), logged by the daemon
    in its format."""

    level: int
    logger: str
    message: str


Message = (
    Load
    | Compute
    | Tokenize
    | Hello
    | Loaded
    | LoadFailed
    | Computed
    | ComputeFailed
    | Tokenized
    | LogLine
)
_TYPES: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Load,
        Compute,
        Tokenize,
        Hello,
        Loaded,
        LoadFailed,
        Computed,
        ComputeFailed,
        Tokenized,
        LogLine,
    )
}


def encode(message: Message) -> bytes:
    """One frame: the length, then [name, field, field, ...]."""
    values = [getattr(message, f.name) for f in fields(message)]
    if isinstance(message, Loaded):
        values = [asdict(message.info), asdict(message.tokenizer), message.replicas]
    body: bytes = msgpack.packb([type(message).__name__, *values], use_bin_type=True)
    if len(body) > MAX_PIPE_FRAME:
        raise PipeError(f"message of {len(body)} bytes is over the pipe's {MAX_PIPE_FRAME}")
    return _LENGTH.pack(len(body)) + body


def _decode_body(body: bytes) -> Message:
    try:
        items = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PipeError(f"undecodable frame: {exc}") from None
    if not isinstance(items, list) or not items or items[0] not in _TYPES:
        raise PipeError(f"not a message: {str(items)[:80]}")
    cls = _TYPES[items[0]]
    args = items[1:]
    try:
        if cls is Loaded:
            info, spec, replicas = args
            wordpiece = spec.pop("wordpiece")
            pair = PairFrame(**spec.pop("pair"))
            return Loaded(
                ModelInfo(**info),
                TokenizerSpec(
                    **spec, wordpiece=WordPieceSpec(**wordpiece) if wordpiece else None, pair=pair
                ),
                replicas,
            )
        message: Message = cls(*args)
    except (TypeError, ValueError, AttributeError) as exc:
        raise PipeError(f"malformed {items[0]}: {exc}") from None
    return message


class PipeDecoder:
    """Bytes from the pipe in, whole messages out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while len(self._buf) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(self._buf)
            if size > MAX_PIPE_FRAME:
                raise PipeError(f"frame of {size} bytes is over the pipe's {MAX_PIPE_FRAME}")
            end = _LENGTH.size + size
            if len(self._buf) < end:
                break
            body = bytes(self._buf[_LENGTH.size : end])
            del self._buf[:end]
            out.append(_decode_body(body))
        return out
