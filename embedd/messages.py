"""Requests as typed values: each op's arguments checked once, with errors that name the key.

Pure functions over decoded msgpack maps; the server calls `parse_request` and then works only
with these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_MODEL
from .errors import Code, EmbeddError

MAX_ID = 2**64 - 1
ENCODINGS = ("f32", "list")
PRIORITIES = ("interactive", "bulk")


@dataclass(frozen=True)
class NoArgs:
    pass


@dataclass(frozen=True)
class ModelArgs:
    model: str = DEFAULT_MODEL


@dataclass(frozen=True)
class CancelArgs:
    target: int


@dataclass(frozen=True)
class TokenizeArgs:
    inputs: tuple[str, ...]
    model: str = DEFAULT_MODEL
    prompt: str | None = None


@dataclass(frozen=True)
class EmbedArgs:
    inputs: tuple[str, ...]
    single: bool
    model: str = DEFAULT_MODEL
    normalize: bool = True
    truncate: bool = False
    dimensions: int | None = None
    prompt: str | None = None
    encoding: str = "f32"
    timeout: float | None = None
    priority: str | None = None
    cache: bool = True


Args = NoArgs | ModelArgs | CancelArgs | TokenizeArgs | EmbedArgs


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: Args


def _bad(message: str, **details: Any) -> EmbeddError:
    return EmbeddError(Code.BAD_REQUEST, message, **details)


def request_id(message: dict[str, Any]) -> int | None:
    """The id to answer with, if the message has a usable one (even when the rest is bad)."""
    rid = message.get("id")
    if isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid <= MAX_ID:
        return rid
    return None


def _get(args: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = args[key]
    if isinstance(value, bool) and kind is not bool:
        raise _bad(f"{key} must be {what}, got a boolean", key=key)
    if not isinstance(value, kind):
        raise _bad(f"{key} must be {what}, got {type(value).__name__}", key=key)
    return value


def _inputs(args: dict[str, Any], max_inputs: int) -> tuple[tuple[str, ...], bool]:
    if "input" not in args:
        raise _bad("input is required (a string or a list of strings)", key="input")
    raw = args["input"]
    if isinstance(raw, str):
        if not raw:
            raise _bad("input is an empty string", key="input", index=0)
        return (raw,), True
    if not isinstance(raw, list):
        raise _bad(
            f"input must be a string or a list of strings, got {type(raw).__name__}", key="input"
        )
    if not raw:
        raise _bad("input is an empty list", key="input")
    if len(raw) > max_inputs:
        raise _bad(
            f"input has {len(raw)} texts, more than the limit of {max_inputs} per request",
            key="input",
            limit=max_inputs,
        )
    for i, text in enumerate(raw):
        if not isinstance(text, str):
            raise _bad(
                f"input[{i}] must be a string, got {type(text).__name__}", key="input", index=i
            )
        if not text:
            raise _bad(f"input[{i}] is an empty string", key="input", index=i)
    return tuple(raw), False


_ALLOWED: dict[str, frozenset[str]] = {
    "hello": frozenset(),
    "health": frozenset(),
    "models": frozenset(),
    "stats": frozenset(),
    "shutdown": frozenset(),
    "load": frozenset({"model"}),
    "unload": frozenset({"model"}),
    "cancel": frozenset({"target"}),
    "tokenize": frozenset({"model", "input", "prompt"}),
    "embed": frozenset(
        {
            "model",
            "input",
            "normalize",
            "truncate",
            "dimensions",
            "prompt",
            "encoding",
            "timeout",
            "priority",
            "cache",
        }
    ),
}
OPS = tuple(_ALLOWED)


def parse_request(message: dict[str, Any], *, max_inputs: int) -> Request:
    rid = request_id(message)
    if rid is None:
        raise _bad(
            f"id must be an unsigned integer below 2**64, got {message.get('id')!r}", key="id"
        )
    op = message.get("op")
    if not isinstance(op, str):
        raise _bad("op must be a string naming the operation", key="op")
    if op not in _ALLOWED:
        raise EmbeddError(Code.UNKNOWN_OP, f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    args = {k: v for k, v in message.items() if k not in ("id", "op")}
    for key in args:
        if key not in _ALLOWED[op]:
            allowed = ", ".join(sorted(_ALLOWED[op])) or "none"
            raise _bad(f"unknown argument {key!r} for op {op} (allowed: {allowed})", key=str(key))
    return Request(rid, op, _parse_args(op, args, max_inputs))


def _model(args: dict[str, Any]) -> str:
    if "model" not in args:
        return DEFAULT_MODEL
    name: str = _get(args, "model", str, "a model name (string)")
    if not name:
        raise _bad("model must not be empty", key="model")
    return name


def _parse_args(op: str, args: dict[str, Any], max_inputs: int) -> Args:
    if op in ("load", "unload"):
        return ModelArgs(_model(args))
    if op == "cancel":
        if "target" not in args:
            raise _bad("target is required (the id of the request to cancel)", key="target")
        target: int = _get(args, "target", int, "a request id (unsigned integer)")
        return CancelArgs(target)
    if op == "tokenize":
        inputs, _single = _inputs(args, max_inputs)
        prompt = _get(args, "prompt", str, "a prompt name (string)") if "prompt" in args else None
        return TokenizeArgs(inputs, _model(args), prompt)
    if op == "embed":
        return _parse_embed(args, max_inputs)
    return NoArgs()


def _parse_embed(args: dict[str, Any], max_inputs: int) -> EmbedArgs:
    inputs, single = _inputs(args, max_inputs)
    kw: dict[str, Any] = {}
    for key in ("normalize", "truncate", "cache"):
        if key in args:
            kw[key] = _get(args, key, bool, "true or false")
    if "dimensions" in args:
        dims: int = _get(args, "dimensions", int, "a positive integer")
        if dims < 1:
            raise _bad(f"dimensions must be >= 1, got {dims}", key="dimensions")
        kw["dimensions"] = dims
    if "prompt" in args:
        kw["prompt"] = _get(args, "prompt", str, "a prompt name (string)")
    if "encoding" in args:
        enc = _get(args, "encoding", str, "a string")
        if enc not in ENCODINGS:
            raise _bad(
                f"encoding must be one of {', '.join(ENCODINGS)}, got {enc!r}", key="encoding"
            )
        kw["encoding"] = enc
    if "timeout" in args:
        timeout = float(_get(args, "timeout", (int, float), "a number of seconds"))
        if not timeout > 0:
            raise _bad(f"timeout must be > 0 seconds, got {timeout}", key="timeout")
        kw["timeout"] = timeout
    if "priority" in args:
        prio = _get(args, "priority", str, "a string")
        if prio not in PRIORITIES:
            raise _bad(
                f"priority must be one of {', '.join(PRIORITIES)}, got {prio!r}", key="priority"
            )
        kw["priority"] = prio
    return EmbedArgs(inputs=inputs, single=single, model=_model(args), **kw)
