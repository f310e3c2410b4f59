"""Requests as typed values: one frozen dataclass per op, each checked once.

Pure functions over decoded msgpack maps. Each op's type is the single place that says which
keys the op takes (its wire fields), how each is checked, and what its defaults are; the
daemon dispatches on the type with `match`, so adding an op is one class here and one case
there, and mypy says when a case is missing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import Code, EmbeddError
from .options import LONG_MODES, POOLS, Long, Pool, VectorOptions
from .precision import PRECISIONS, Precision

# The model a request names when it names none (the bundled one unless the config replaces it).
DEFAULT_MODEL = "default"
MAX_ID = 2**64 - 1
ENCODINGS = ("f32", "list")
PRIORITIES = ("interactive", "bulk")
# The longest `timeout` a request may ask for. An hour is far beyond any embedding request
# (100,000 long chunks take about an hour on 2 cores with the bundled model), and a finite cap
# keeps every wait in the daemon and the client bounded (1e10 overflowed the client's clock).
MAX_TIMEOUT = 3600.0
# Documents one `rerank` request may score: the most Cohere's rerank API recommends per
# request, which reranking clients are written for (every document is a full pass of the
# model beside the query); the config's `max_inputs` lowers it further when it is smaller.
MAX_RERANK_DOCUMENTS = 1000
# Echoed client values (ids, keys, op names) are cut to this many characters in error
# messages, so that a hostile 60 MB value cannot turn into a 180 MB error frame.
MAX_ECHO = 80


def echo(value: object) -> str:
    """`repr(value)`, bounded: error messages quote what the client sent, never all of it."""
    if isinstance(value, str | bytes) and len(value) > MAX_ECHO:
        return f"{value[:MAX_ECHO]!r}... ({len(value)} long)"
    text = repr(value) if not isinstance(value, list | dict | tuple) else type(value).__name__
    return text if len(text) <= MAX_ECHO else text[:MAX_ECHO] + "..."


@dataclass(frozen=True)
class Limits:
    """What the daemon's configuration bounds while parsing (see `Config`)."""

    max_inputs: int = 100_000


def _bad(message: str, **details: Any) -> EmbeddError:
    return EmbeddError(Code.BAD_REQUEST, message, **details)


def _typed(args: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = args[key]
    if isinstance(value, bool) and kind is not bool:
        raise _bad(f"{key} must be {what}, got a boolean", key=key)
    if not isinstance(value, kind):
        raise _bad(f"{key} must be {what}, got {type(value).__name__}", key=key)
    return value


def _model(args: Mapping[str, Any]) -> str:
    if "model" not in args:
        return DEFAULT_MODEL
    name: str = _typed(args, "model", str, "a model name (string)")
    if not name:
        raise _bad("model must not be empty", key="model")
    return name


def _check_text(text: str, index: int) -> None:
    if not text:
        raise _bad(f"input[{index}] is an empty string", key="input", index=index)
    if not text.strip():
        # Whitespace alone tokenizes to the special frame only: every such input would get the
        # same meaningless vector, so it is refused like an empty string.
        raise _bad(f"input[{index}] holds only whitespace", key="input", index=index)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(
            f"input[{index}] is not valid UTF-8 (an unpaired surrogate at character "
            f"{exc.start}); send well-formed UTF-8",
            key="input",
            index=index,
        ) from None


def _inputs(args: Mapping[str, Any], limits: Limits) -> tuple[tuple[str, ...], bool]:
    if "input" not in args:
        raise _bad("input is required (a string or a list of strings)", key="input")
    raw = args["input"]
    if isinstance(raw, str):
        _check_text(raw, 0)
        return (raw,), True
    if not isinstance(raw, list):
        raise _bad(
            f"input must be a string or a list of strings, got {type(raw).__name__}", key="input"
        )
    if not raw:
        raise _bad("input is an empty list", key="input")
    if len(raw) > limits.max_inputs:
        raise _bad(
            f"input has {len(raw)} texts, more than the limit of {limits.max_inputs} per request",
            key="input",
            limit=limits.max_inputs,
        )
    for i, text in enumerate(raw):
        if not isinstance(text, str):
            raise _bad(
                f"input[{i}] must be a string, got {type(text).__name__}", key="input", index=i
            )
        _check_text(text, i)
    return tuple(raw), False


def _choice(args: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value: str = _typed(args, key, str, "a string")
    if value not in choices:
        raise _bad(f"{key} must be one of {', '.join(choices)}, got {echo(value)}", key=key)
    return value


def _timeout(args: Mapping[str, Any]) -> float:
    timeout = float(_typed(args, "timeout", (int, float), "a number of seconds"))
    if not (timeout > 0 and math.isfinite(timeout)):
        raise _bad(f"timeout must be a number of seconds > 0, got {timeout}", key="timeout")
    if timeout > MAX_TIMEOUT:
        raise _bad(
            f"timeout {timeout:g}s exceeds the maximum of {MAX_TIMEOUT:g}s",
            key="timeout",
            limit=MAX_TIMEOUT,
        )
    return timeout


# --- one type per op --------------------------------------------------------------------------


def _derived(default: Any) -> Any:
    """A field computed while parsing, never sent by a client (not a wire key)."""
    return dataclasses.field(default=default, metadata={"wire": False})


@dataclass(frozen=True)
class Op:
    """Base of every op's request type. `op` is the wire name; the dataclass fields (except
    those marked `wire: False`) are exactly the keys a client may send besides `id` and `op`."""

    op: ClassVar[str]
    # Refused while the daemon drains: it is new work, not a question about the daemon.
    is_work: ClassVar[bool] = False

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("wire", True))

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Op:
        return cls()


@dataclass(frozen=True)
class Hello(Op):
    op = "hello"


@dataclass(frozen=True)
class Health(Op):
    op = "health"


@dataclass(frozen=True)
class Models(Op):
    op = "models"


@dataclass(frozen=True)
class Stats(Op):
    op = "stats"


@dataclass(frozen=True)
class Shutdown(Op):
    op = "shutdown"
    is_work = True


@dataclass(frozen=True)
class _ModelOp(Op):
    """An op whose one argument is a model name."""

    is_work = True
    model: str = DEFAULT_MODEL

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Op:
        return cls(_model(args))


@dataclass(frozen=True)
class Load(_ModelOp):
    op = "load"


@dataclass(frozen=True)
class Unload(_ModelOp):
    op = "unload"


@dataclass(frozen=True)
class Cancel(Op):
    op = "cancel"
    target: int = 0

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Cancel:
        if "target" not in args:
            raise _bad("target is required (the id of the request to cancel)", key="target")
        target: int = _typed(args, "target", int, "a request id (unsigned integer)")
        return cls(target)


@dataclass(frozen=True)
class Tokenize(Op):
    op = "tokenize"
    is_work = True
    input: tuple[str, ...] = ()
    model: str = DEFAULT_MODEL
    prompt: str | None = None
    # Each token's text and span too (the HTTP front's TEI /tokenize), not a wire key.
    pieces: bool = _derived(False)

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Tokenize:
        inputs, _single = _inputs(args, limits)
        prompt = _typed(args, "prompt", str, "a prompt name (string)") if "prompt" in args else None
        return cls(inputs, _model(args), prompt)


@dataclass(frozen=True)
class Embed(Op):
    op = "embed"
    is_work = True
    input: tuple[str, ...] = ()
    model: str = DEFAULT_MODEL
    normalize: bool = True
    truncate: bool = False
    dimensions: int | None = None
    prompt: str | None = None
    encoding: str = "f32"
    # How each vector is given (precision.py); not a vector option: the cache holds float32.
    precision: Precision = "float32"
    timeout: float | None = None
    priority: str | None = None
    cache: bool = True
    long: Long = "error"
    overlap: int = 0
    pool: Pool = "mean"
    # Whether `input` was one string (the answer then describes one vector).
    single: bool = _derived(False)

    @property
    def cuts(self) -> bool:
        """Over-long inputs are cut (`truncate: true` is `long: "truncate"`)."""
        return self.truncate or self.long == "truncate"

    @property
    def options(self) -> VectorOptions:
        """What of this request changes its vectors."""
        return VectorOptions(
            long="truncate" if self.cuts else self.long,
            overlap=self.overlap,
            pool=self.pool,
            prompt=self.prompt,
            normalize=self.normalize,
            dimensions=self.dimensions,
        )

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Embed:
        inputs, single = _inputs(args, limits)
        kw: dict[str, Any] = {}
        for key in ("normalize", "truncate", "cache"):
            if key in args:
                kw[key] = _typed(args, key, bool, "true or false")
        if "dimensions" in args:
            dims: int = _typed(args, "dimensions", int, "a positive integer")
            if dims < 1:
                raise _bad(f"dimensions must be >= 1, got {dims}", key="dimensions")
            kw["dimensions"] = dims
        if "prompt" in args:
            kw["prompt"] = _typed(args, "prompt", str, "a prompt name (string)")
        if "encoding" in args:
            kw["encoding"] = _choice(args, "encoding", ENCODINGS)
        if "precision" in args:
            kw["precision"] = _choice(args, "precision", PRECISIONS)
        if "timeout" in args:
            kw["timeout"] = _timeout(args)
        if "priority" in args:
            kw["priority"] = _choice(args, "priority", PRIORITIES)
        if "long" in args:
            kw["long"] = _choice(args, "long", LONG_MODES)
            if kw.get("truncate") and kw["long"] != "truncate":
                raise _bad(f"truncate=true contradicts long={kw['long']!r}", key="long")
        if "pool" in args:
            kw["pool"] = _choice(args, "pool", POOLS)
        if "overlap" in args:
            kw["overlap"] = _count(args, "overlap")
        if ("pool" in kw or "overlap" in kw) and kw.get("long") != "split":
            raise _bad('pool and overlap apply to long="split" only', key="long")
        return cls(input=inputs, model=_model(args), single=single, **kw)


def _count(args: Mapping[str, Any], key: str) -> int:
    value: int = _typed(args, key, int, "a number of tokens (integer >= 0)")
    if value < 0:
        raise _bad(f"{key} must be >= 0, got {value}", key=key)
    return value


@dataclass(frozen=True)
class Chunk(Op):
    op = "chunk"
    is_work = True
    input: str = ""
    model: str = DEFAULT_MODEL
    # Tokens per chunk, special frame included; None: the model's limit.
    max_tokens: int | None = None
    overlap: int = 0

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Chunk:
        inputs, single = _inputs(args, limits)
        if not single:
            raise _bad("input must be one string (the text to chunk)", key="input")
        max_tokens = None
        if "max_tokens" in args:
            max_tokens = _count(args, "max_tokens")
            if max_tokens < 4:
                raise _bad(f"max_tokens must be >= 4, got {max_tokens}", key="max_tokens")
        overlap = _count(args, "overlap") if "overlap" in args else 0
        return cls(inputs[0], _model(args), max_tokens, overlap)


def _rerank_text(value: Any, key: str, index: int | None = None) -> str:
    """A query or document: a non-empty string of well-formed UTF-8 with more than
    whitespace in it (such a text would be scored on the special tokens alone)."""
    where = key if index is None else f"{key}[{index}]"
    if not isinstance(value, str):
        raise _bad(f"{where} must be a string, got {type(value).__name__}", key=key, index=index)
    if not value.strip():
        raise _bad(f"{where} is empty or holds only whitespace", key=key, index=index)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(
            f"{where} is not valid UTF-8 (an unpaired surrogate at character {exc.start})",
            key=key,
            index=index,
        ) from None
    return value


@dataclass(frozen=True)
class Rerank(Op):
    """Score each document against the query with a cross-encoder (a reranking model); the
    answer lists the documents by score, best first, `top_n` of them."""

    op = "rerank"
    is_work = True
    query: str = ""
    documents: tuple[str, ...] = ()
    model: str = DEFAULT_MODEL
    top_n: int | None = None
    return_documents: bool = False
    timeout: float | None = None
    priority: str | None = None
    cache: bool = True

    @classmethod
    def parse(cls, args: Mapping[str, Any], limits: Limits) -> Rerank:
        if "query" not in args:
            raise _bad("query is required (a string)", key="query")
        query = _rerank_text(args["query"], "query")
        if "documents" not in args:
            raise _bad("documents is required (a list of strings)", key="documents")
        raw = args["documents"]
        if not isinstance(raw, list):
            raise _bad(
                f"documents must be a list of strings, got {type(raw).__name__}", key="documents"
            )
        if not raw:
            raise _bad("documents is an empty list", key="documents")
        most = min(MAX_RERANK_DOCUMENTS, limits.max_inputs)
        if len(raw) > most:
            raise _bad(
                f"documents has {len(raw)} texts, more than the limit of {most} per request "
                "(MAX_RERANK_DOCUMENTS, or the config's max_inputs if lower)",
                key="documents",
                limit=most,
            )
        documents = tuple(_rerank_text(doc, "documents", i) for i, doc in enumerate(raw))
        kw: dict[str, Any] = {}
        if "top_n" in args:
            top_n: int = _typed(args, "top_n", int, "a number of documents (integer >= 1)")
            if top_n < 1:
                raise _bad(f"top_n must be >= 1, got {top_n}", key="top_n")
            kw["top_n"] = top_n
        for key in ("return_documents", "cache"):
            if key in args:
                kw[key] = _typed(args, key, bool, "true or false")
        if "timeout" in args:
            kw["timeout"] = _timeout(args)
        if "priority" in args:
            kw["priority"] = _choice(args, "priority", PRIORITIES)
        return cls(query=query, documents=documents, model=_model(args), **kw)


Args = (
    Hello
    | Health
    | Models
    | Stats
    | Shutdown
    | Load
    | Unload
    | Cancel
    | Tokenize
    | Embed
    | Chunk
    | Rerank
)
# The ops, by wire name: the one list of what the daemon understands.
OP_TYPES: dict[str, type[Op]] = {
    t.op: t
    for t in (
        Hello, Health, Models, Stats, Shutdown, Load, Unload, Cancel, Tokenize, Embed, Chunk,
        Rerank,
    )
}  # fmt: skip
OPS = tuple(OP_TYPES)


@dataclass(frozen=True)
class Request:
    id: int
    args: Args

    @property
    def op(self) -> str:
        return self.args.op


def request_id(message: Mapping[Any, Any]) -> int | None:
    """The id to answer with, if the message has a usable one (even when the rest is bad)."""
    rid = message.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
        return rid
    return None


def parse_request(message: Mapping[Any, Any], limits: Limits) -> Request:
    rid = request_id(message)
    if rid is None:
        raise _bad(
            f"id must be an unsigned integer below 2**64 (msgpack uint), got "
            f"{echo(message.get('id'))}",
            key="id",
        )
    op = message.get("op")
    if not isinstance(op, str):
        raise _bad("op must be a string naming the operation", key="op")
    kind = OP_TYPES.get(op)
    if kind is None:
        raise EmbeddError(Code.UNKNOWN_OP, f"unknown op {echo(op)}; known ops: {', '.join(OPS)}")
    args = {k: v for k, v in message.items() if k not in ("id", "op")}
    allowed = kind.wire_keys()
    for key in args:
        if key not in allowed:
            names = ", ".join(sorted(allowed)) or "none"
            raise _bad(
                f"unknown argument {echo(key)} for op {op} (allowed: {names})", key=str(key)[:80]
            )
    parsed = kind.parse(args, limits)
    assert isinstance(parsed, Args)  # every op type is in the union
    return Request(rid, parsed)
