"""The OpenAI- and Ollama-compatible HTTP APIs as pure translations onto embedd's own requests.

Each endpoint turns a JSON body into the same typed request the msgpack socket produces
(`messages.Embed`, checked by the same rules, so both doors refuse the same things) and turns
the daemon's result or `EmbeddError` into the JSON shape and status that API's clients expect.
No I/O here: `http/server.py` moves the bytes and calls the daemon.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy.typing as npt

from .. import __version__
from ..wire import precision as compact
from ..wire.answers import EmbedAnswer, RerankAnswer, Sizing, TokenizeAnswer
from ..wire.errors import Code, EmbeddError
from ..wire.messages import DEFAULT_MODEL, Chunk, Embed, Limits, Rerank, Tokenize

# What embedd says it is to apps that probe Ollama (`GET /api/version`): the Ollama API
# version whose /api/embed fields this front implements.
OLLAMA_API_VERSION = "0.12.0"

_STATUS = {
    Code.BAD_REQUEST: HTTPStatus.BAD_REQUEST,
    Code.INPUT_TOO_LONG: HTTPStatus.BAD_REQUEST,
    Code.UNKNOWN_OP: HTTPStatus.BAD_REQUEST,
    Code.UNKNOWN_MODEL: HTTPStatus.NOT_FOUND,
    Code.MODEL_LOAD_FAILED: HTTPStatus.INTERNAL_SERVER_ERROR,
    Code.MODEL_CRASHED: HTTPStatus.INTERNAL_SERVER_ERROR,
    Code.BUSY: HTTPStatus.TOO_MANY_REQUESTS,
    Code.TIMEOUT: HTTPStatus.GATEWAY_TIMEOUT,
    Code.CANCELLED: HTTPStatus.BAD_REQUEST,
    Code.SHUTTING_DOWN: HTTPStatus.SERVICE_UNAVAILABLE,
    Code.FRAME_TOO_LARGE: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    Code.PROTOCOL_ERROR: HTTPStatus.BAD_REQUEST,
    Code.FORBIDDEN: HTTPStatus.FORBIDDEN,
    Code.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
}
_OPENAI_TYPE = {
    HTTPStatus.BAD_REQUEST: "invalid_request_error",
    HTTPStatus.NOT_FOUND: "invalid_request_error",
    HTTPStatus.TOO_MANY_REQUESTS: "rate_limit_error",
    HTTPStatus.UNAUTHORIZED: "authentication_error",
}


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """A request refused before it reaches the daemon, already in its API's error shape."""

    def __init__(self, response: Response) -> None:
        super().__init__(str(response.body))
        self.response = response


def status_of(error: EmbeddError) -> HTTPStatus:
    return _STATUS.get(error.code, HTTPStatus.INTERNAL_SERVER_ERROR)


def _retry_headers(error: EmbeddError) -> dict[str, str]:
    retry = error.details.get("retry_after")
    return {"Retry-After": str(max(1, round(retry)))} if retry is not None else {}


def openai_error(error: EmbeddError) -> Response:
    status = status_of(error)
    param = error.details.get("key")
    if error.code == Code.UNKNOWN_MODEL:
        param = "model"
    body = {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPE.get(status, "server_error"),
            "param": param,
            "code": "model_not_found" if error.code == Code.UNKNOWN_MODEL else str(error.code),
            **{k: v for k, v in error.details.items() if k in ("index", "limit", "tokens")},
        }
    }
    return Response(status, body, _retry_headers(error))


def ollama_error(error: EmbeddError) -> Response:
    return Response(status_of(error), {"error": error.message}, _retry_headers(error))


def http_error(status: HTTPStatus, message: str) -> Response:
    """An error of the HTTP layer itself (bad JSON, unknown path, missing key)."""
    return Response(
        status,
        {"error": {"message": message, "type": _OPENAI_TYPE.get(status, "server_error")}},
    )


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or `bad_request` saying why it is not one (each route
    gives that error its API's shape)."""
    try:
        value = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise EmbeddError(Code.BAD_REQUEST, f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        # json's C scanner counts its depth against the recursion limit and stops cleanly:
        # 100,000 nested "[" is a malformed request, not a crash.
        raise EmbeddError(Code.BAD_REQUEST, "body is not valid JSON: nested too deeply") from exc
    if not isinstance(value, dict):
        raise EmbeddError(Code.BAD_REQUEST, "body must be a JSON object")
    return value


def parse_json(body: bytes) -> dict[str, Any]:
    """`json_object`, its refusal in the shape of the HTTP layer's own errors."""
    try:
        return json_object(body)
    except EmbeddError as exc:
        raise ApiError(http_error(HTTPStatus.BAD_REQUEST, exc.message)) from exc


# The longest JSON text of one vector component: a float32 widened to float64 prints up to 17
# significant digits with sign, point and exponent ("-1.2345678442978859e-05", 23 characters),
# plus its comma. The bundled model's unit vectors measured 21-23 bytes per float on average,
# against 4 in the msgpack answer: sized at 4 bytes, a 0.6 MB request could ask for a
# 323 MB answer.
JSON_FLOAT_BYTES = 24
# Each row's own keys ({"object":"embedding","index":99999,"embedding":...}) with room to spare.
_ROW_BYTES = 64
# The answer's envelope: object, model, usage, Ollama's durations.
_ENVELOPE_BYTES = 512


# The longest JSON text of one packed byte of signs: "-128" and its comma.
JSON_BYTE_BYTES = 5


_JSON_UNIT = "bytes of JSON"
_JSON_ADVICE = (
    "send fewer inputs per request (or ask for encoding_format base64, a compact precision, "
    "or fewer dimensions)"
)


def answer_sizing(encoding_format: str = "float", precision: str = "float32") -> Sizing:
    """How an embedding answer in this encoding_format and precision is sized (the daemon
    checks it against max_response once the model's dimension is known, before any work)."""
    if encoding_format == "base64":
        # The precision's bytes in base64 (4 characters per 3 bytes) and quoted, with room
        # for the padding.
        per_component = compact.component_bytes(precision) * 4 / 3
        return Sizing(per_component, _ROW_BYTES + 2 + 4, _ENVELOPE_BYTES, _JSON_UNIT, _JSON_ADVICE)
    per_component = JSON_BYTE_BYTES / 8 if compact.is_packed(precision) else JSON_FLOAT_BYTES
    return Sizing(per_component, _ROW_BYTES + 2, _ENVELOPE_BYTES, _JSON_UNIT, _JSON_ADVICE)


def answer_bytes(
    rows: int, dim: int, encoding_format: str = "float", precision: str = "float32"
) -> int:
    """An embedding answer's size in bytes at most (rows x dim)."""
    return answer_sizing(encoding_format, precision).size(rows, dim)


def check_answer_size(size: int, max_response: int) -> None:
    """Refuse an answer larger than `max_response`."""
    if size > max_response:
        raise answer_sizing().refusal(size, max_response)


def _bad(message: str, key: str) -> EmbeddError:
    return EmbeddError(Code.BAD_REQUEST, message, key=key)


def _is_token_ids(value: Any) -> bool:
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return True
    return isinstance(value, list) and any(isinstance(v, list) for v in value)


# --- OpenAI -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIEmbed:
    request: Embed
    encoding_format: str


# What each endpoint's body may hold: the API's own keys (OpenAI's `user`, Ollama's `options`
# and `keep_alive`, accepted and unused) and embedd's options, which the OpenAI SDKs send from
# `extra_body`. Anything else is refused naming the key, as the msgpack socket does, so a
# misspelt option never passes silently.
OPENAI_KEYS = frozenset(
    {"input", "model", "encoding_format", "dimensions", "user"}
    | {"truncate", "priority", "prompt", "long", "overlap", "precision"}
)
OLLAMA_EMBED_KEYS = frozenset(
    {"model", "input", "truncate", "options", "keep_alive", "dimensions"}
    | {"priority", "prompt", "long", "overlap", "precision"}
)
OLLAMA_LEGACY_KEYS = frozenset({"model", "prompt", "options", "keep_alive"})


def _check_keys(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in body:
        if key not in allowed:
            raise _bad(
                f"unknown key {str(key)[:80]!r} (allowed: {', '.join(sorted(allowed))})",
                str(key)[:80],
            )


def _long_args(body: Mapping[str, Any], default: str) -> dict[str, Any]:
    """How an over-long input is handled: what the body says (`long`, or `truncate`), else
    the model's `http_long`. A JSON null is no answer, as for every other key here: clients
    that serialise unset options as null (`"truncate": null`) get the model's default."""
    given = {k: body[k] for k in ("long", "truncate", "overlap") if body.get(k) is not None}
    if "long" in given or "truncate" in given:
        return given
    if "overlap" in given:
        return {"long": "split", "overlap": given["overlap"]} if default == "split" else {}
    return {"truncate": True} if default == "truncate" else {"long": default}


def long_report(answer: EmbedAnswer) -> tuple[dict[str, Any], dict[str, str]]:
    """What was cut or split, for the answer (an `embedd` field) and its headers: an app that
    never reads either still gets the whole text's vector, and one that cares can tell."""
    truncated = [i for i, cut in enumerate(answer.truncated) if cut]
    windows = {str(i): n for i, n in enumerate(answer.windows) if n > 1}
    headers = {}
    if truncated:
        headers["X-Embedd-Truncated"] = str(len(truncated))
    if windows:
        headers["X-Embedd-Split"] = str(len(windows))
    return {"truncated": truncated, "windows": windows}, headers


def openai_embed(
    body: Mapping[str, Any], limits: Limits, long_default: str = "error"
) -> OpenAIEmbed:
    """`POST /v1/embeddings` -> the typed request. Raises EmbeddError (-> openai_error)."""
    _check_keys(body, OPENAI_KEYS)
    if "input" in body and _is_token_ids(body["input"]):
        raise _bad(
            "input holds token ids; embedd takes text, tokenized by the model's own tokenizer "
            "(LangChain's OpenAIEmbeddings sends tiktoken ids unless you pass "
            "check_embedding_ctx_length=False)",
            "input",
        )
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise _bad(f"encoding_format must be float or base64, got {fmt!r:.40}", "encoding_format")
    if "model" not in body:
        raise _bad("model is required", "model")
    args: dict[str, Any] = {"input": body.get("input"), "model": body["model"], "encoding": "f32"}
    for key in ("dimensions", "priority", "prompt", "precision"):
        if key in body and body[key] is not None:
            args[key] = body[key]
    args.update(_long_args(body, long_default))
    if "input" not in body:
        del args["input"]
    return OpenAIEmbed(Embed.parse(args, limits), fmt)


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_rows(rows: npt.NDArray[Any], row: Any) -> bytearray:
    """`[row(0, r0),row(1, r1),...]` as JSON, built a row at a time into one buffer: a whole
    answer as Python objects first (a float object per component, ~30 bytes each) took several
    times the answer's size, and the freed objects kept the daemon's RSS up after it."""
    out = bytearray(b"[")
    for i, r in enumerate(rows):
        if i:
            out += b","
        out += _json(row(i, r))
    out += b"]"
    return out


def openai_embed_json(call: OpenAIEmbed, answer: EmbedAnswer) -> bytearray:
    """The `POST /v1/embeddings` answer, encoded (JSON; large answers are built off the loop)."""

    dtype = compact.DTYPES[answer.precision]

    def row(i: int, r: npt.NDArray[Any]) -> dict[str, Any]:
        embedding: Any
        if call.encoding_format == "base64":
            # What the OpenAI SDKs decode: the little-endian float32 bytes, base64 (or the
            # requested precision's bytes: float16, or the packed signs).
            embedding = base64.b64encode(r.astype(dtype).tobytes()).decode("ascii")
        else:
            embedding = r.tolist()
        return {"object": "embedding", "index": i, "embedding": embedding}

    tokens = answer.usage.prompt_tokens
    out = bytearray(b'{"object":"list","data":')
    out += _json_rows(answer.compact(), row)
    out += b',"model":' + _json(answer.model)
    out += b',"usage":' + _json({"prompt_tokens": tokens, "total_tokens": tokens})
    out += b',"embedd":' + _json(long_report(answer)[0]) + b"}"
    return out


def _names(models: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """Every name a request may use, aliases included, with its model: apps check that the
    name they were configured with is listed before they send it."""
    return [(name, m) for m in models for name in (m["name"], *m.get("aliases", ()))]


def openai_models(models: Sequence[Mapping[str, Any]], started: float) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": int(started), "owned_by": "embedd"}
            for name, _m in _names(models)
        ],
    }


# --- Ollama -----------------------------------------------------------------------------------


def _ollama_model(body: Mapping[str, Any]) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise _bad("model is required", "model")
    # Ollama names carry a tag; embedd's models have none, so ":latest" means the name.
    return name.removesuffix(":latest")


def ollama_embed(body: Mapping[str, Any], limits: Limits, long_default: str = "truncate") -> Embed:
    """`POST /api/embed`: `truncate` as Ollama's clients send it (true cuts, false refuses),
    and when they send nothing, the model's `http_long`."""
    _check_keys(body, OLLAMA_EMBED_KEYS)
    args: dict[str, Any] = {
        "input": body.get("input"),
        "model": _ollama_model(body),
        "encoding": "f32",
        **_long_args(body, long_default),
    }
    for key in ("dimensions", "priority", "prompt", "precision"):
        if body.get(key) is not None:
            args[key] = body[key]
    if "input" not in body:
        del args["input"]
    return Embed.parse(args, limits)


def ollama_embed_json(answer: EmbedAnswer, model: str, started_ns: int, load_ns: int) -> bytearray:
    """The `POST /api/embed` answer, encoded as `openai_embed_json` is."""
    out = bytearray(b'{"model":' + _json(model) + b',"embeddings":')
    out += _json_rows(answer.compact(), lambda _i, r: r.tolist())
    out += b',"total_duration":' + _json(time.monotonic_ns() - started_ns)
    out += b',"load_duration":' + _json(load_ns)
    out += b',"prompt_eval_count":' + _json(answer.usage.prompt_tokens)
    out += b',"embedd":' + _json(long_report(answer)[0]) + b"}"
    return out


def ollama_legacy(body: Mapping[str, Any], limits: Limits, long_default: str = "truncate") -> Embed:
    """`POST /api/embeddings` (`prompt` -> `embedding`): Ollama's older endpoint, which has no
    `truncate`: the model's `http_long` decides."""
    _check_keys(body, OLLAMA_LEGACY_KEYS)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string", "prompt")
    args = {
        "input": prompt,
        "model": _ollama_model(body),
        "encoding": "f32",
        **_long_args({}, long_default),
    }
    return Embed.parse(args, limits)


def ollama_legacy_result(answer: EmbedAnswer) -> dict[str, Any]:
    return {"embedding": answer.vectors[0].tolist()}


def _ollama_entry(name: str, m: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "size": m.get("size") or 0,
        "digest": m.get("sha256") or "",
        "details": {
            "format": "gguf",
            "family": m.get("architecture") or "",
            "quantization_level": m.get("quantization") or "",
        },
    }


def ollama_tags(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"models": [_ollama_entry(name, m) for name, m in _names(models)]}


def ollama_ps(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "models": [
            {**_ollama_entry(name, m), "size_vram": 0}
            for name, m in _names(models)
            if m.get("state") == "ready"
        ]
    }


def ollama_version() -> dict[str, Any]:
    return {"version": OLLAMA_API_VERSION, "server": f"embedd {__version__}"}


# --- text-embeddings-inference (TEI) ----------------------------------------------------------
# Hugging Face's embedding server, whose routes many libraries speak (LangChain's
# HuggingFaceEndpointEmbeddings, LlamaIndex's TextEmbeddingsInference, huggingface_hub's
# InferenceClient.feature_extraction). TEI serves one model; embedd serves several, so these
# routes use the model named "default" unless the body names another (`model`, an extra).

# The API version whose /embed, /tokenize and /info shapes these routes follow.
TEI_API_VERSION = "1.8.0"

# TEI's error kinds (its `ErrorType`) and the status each has there.
_TEI_KIND = {
    Code.INPUT_TOO_LONG: ("Validation", HTTPStatus.REQUEST_ENTITY_TOO_LARGE),
    Code.BUSY: ("Overloaded", HTTPStatus.TOO_MANY_REQUESTS),
    Code.MODEL_LOAD_FAILED: ("Backend", HTTPStatus.FAILED_DEPENDENCY),
    Code.MODEL_CRASHED: ("Backend", HTTPStatus.FAILED_DEPENDENCY),
    Code.INTERNAL: ("Backend", HTTPStatus.FAILED_DEPENDENCY),
    Code.SHUTTING_DOWN: ("Unhealthy", HTTPStatus.SERVICE_UNAVAILABLE),
    Code.TIMEOUT: ("Backend", HTTPStatus.GATEWAY_TIMEOUT),
}


# The keys whose refusals with a `limit` are TEI's 413: the texts of a request, counted or
# sized (`documents` is where a rerank answer echoing them is refused over max_response).
_TEI_COUNTED = frozenset({"input", "texts", "documents"})


def tei_error(error: EmbeddError) -> Response:
    """Every refusal of a TEI route, in TEI's shape (`{"error", "error_type"}`) and with its
    status: 413 for what is over a limit (too many inputs, an input over the model's tokens,
    an answer over max_response), 422 for other invalid requests, 424 when the model fails,
    429 when busy (with Retry-After), 503 while shutting down. A timeout keeps embedd's 504
    (TEI has no request timeout), and what else TEI has no kind for keeps embedd's status."""
    kind, status = _TEI_KIND.get(error.code, ("Validation", status_of(error)))
    if error.code in (Code.BAD_REQUEST, Code.UNKNOWN_MODEL, Code.UNKNOWN_OP):
        # Too many inputs (or rerank texts), or an answer over max_response, is over a limit.
        over_limit = "limit" in error.details and error.details.get("key") in _TEI_COUNTED
        status = (
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE if over_limit else HTTPStatus.UNPROCESSABLE_ENTITY
        )
    return Response(status, {"error": error.message, "error_type": kind}, _retry_headers(error))


TEI_EMBED_KEYS = frozenset(
    {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name"}
    | {"dimensions", "encoding_format", "model", "precision"}
)
TEI_TOKENIZE_KEYS = frozenset({"inputs", "add_special_tokens", "prompt_name", "model"})


def tei_model(body: Mapping[str, Any]) -> str:
    """The model a TEI route uses: `default`, or the one the body names (an extra)."""
    name = body.get("model")
    return name if isinstance(name, str) and name else DEFAULT_MODEL


def tei_embed(body: Mapping[str, Any], limits: Limits, long_default: str = "error") -> Embed:
    """`POST /embed` (and `POST /`, where huggingface_hub sends it) -> the typed request.
    `truncate` true cuts, false refuses, absent leaves it to the model's `http_long`;
    `prompt_name` is one of the model's configured prompts."""
    _check_keys(body, TEI_EMBED_KEYS)
    direction = body.get("truncation_direction")
    if direction is not None and str(direction).lower() != "right":
        raise _bad(
            "truncation_direction must be right: embedd cuts at the end", "truncation_direction"
        )
    if body.get("encoding_format") not in (None, "float"):
        raise _bad("encoding_format must be float on /embed", "encoding_format")
    if "inputs" not in body:
        raise _bad("inputs is required (a string or a list of strings)", "inputs")
    args: dict[str, Any] = {"input": body["inputs"], "model": tei_model(body), "encoding": "f32"}
    truncate = body.get("truncate")
    if truncate is not None:
        if not isinstance(truncate, bool):
            raise _bad("truncate must be true or false", "truncate")
        args["long"] = "truncate" if truncate else "error"
    else:
        args.update(_long_args({}, long_default))
    for key, ours in (("normalize", "normalize"), ("prompt_name", "prompt")):
        if body.get(key) is not None:
            args[ours] = body[key]
    for key in ("dimensions", "precision"):
        if body.get(key) is not None:
            args[key] = body[key]
    return Embed.parse(args, limits)


def tei_embed_json(answer: EmbedAnswer) -> bytearray:
    """TEI's /embed answer: a list of vectors (one per input, a single string's too)."""
    return _json_rows(answer.compact(), lambda _i, r: r.tolist())


@dataclass(frozen=True)
class TeiTokenize:
    request: Tokenize
    add_special_tokens: bool


def tei_tokenize(body: Mapping[str, Any], limits: Limits) -> TeiTokenize:
    """`POST /tokenize`: `inputs`, `add_special_tokens` (default true: the model's special
    frame, such as [CLS] and [SEP], is in the answer), `prompt_name`, and the extra `model`."""
    _check_keys(body, TEI_TOKENIZE_KEYS)
    if "inputs" not in body:
        raise _bad("inputs is required (a string or a list of strings)", "inputs")
    args: dict[str, Any] = {"input": body["inputs"], "model": tei_model(body)}
    if body.get("prompt_name") is not None:
        args["prompt"] = body["prompt_name"]
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise _bad("add_special_tokens must be true or false", "add_special_tokens")
    return TeiTokenize(dataclasses.replace(Tokenize.parse(args, limits), pieces=True), special)


def tei_tokenize_json(call: TeiTokenize, answer: TokenizeAnswer) -> bytes:
    """TEI's /tokenize answer: per text, its tokens as `{id, text, special, start, stop}`
    with `start`/`stop` in UTF-8 bytes of the text as tokenized (the prompt's prefix first,
    if any), as TEI counts them; null for the special frame. Only vocabularies embedd
    tokenizes itself know each token's text."""
    if answer.pieces is None:
        raise EmbeddError(
            Code.BAD_REQUEST,
            f"model {answer.model!r} has a vocabulary that llama.cpp tokenizes: its tokens' "
            "texts and offsets are not known to embedd (only WordPiece ones are); "
            "POST /v1/tokenize gives any model's token ids",
            key="model",
        )
    out = [
        [
            {"id": p.id, "text": p.text, "special": p.special, "start": p.start, "stop": p.end}
            for p in pieces
            if call.add_special_tokens or p.start is not None
        ]
        for pieces in answer.pieces
    ]
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode()


def tei_model_dtype(quantization: str | None) -> str:
    """A GGUF file type as TEI names a model's dtype ("F16" -> "float16")."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return names.get(quantization or "", (quantization or "unknown").lower())


def tei_info(
    model: Mapping[str, Any], *, batch_tokens: int, http_long: str, **limits: int
) -> dict[str, Any]:
    """`GET /info` for the model the TEI routes use (`models`' description of it, loaded):
    `auto_truncate` says whether an over-long input is answered rather than refused (cut, or
    split into windows whose vectors are pooled: the model's `http_long`)."""
    max_tokens = int(model.get("max_tokens") or 0)
    return {
        "model_id": model["name"],
        "model_sha": model.get("fingerprint"),
        "model_dtype": tei_model_dtype(model.get("quantization")),
        "model_type": {"embedding": {"pooling": model.get("pooling") or "unknown"}},
        "max_concurrent_requests": limits["max_concurrent_requests"],
        "max_input_length": max_tokens,
        # Every input fits one batch whole, so a batch holds at least the model's limit.
        "max_batch_tokens": max(batch_tokens, max_tokens),
        "max_batch_requests": None,
        "max_client_batch_size": limits["max_client_batch_size"],
        "auto_truncate": http_long != "error",
        "tokenization_workers": 1,
        "version": TEI_API_VERSION,
        "sha": None,
        "docker_label": None,
        "embedd": {"version": __version__, "http_long": http_long, "dim": model.get("dim")},
    }


# --- embedd's own ops over HTTP: chunk and tokenize -------------------------------------------

CHUNK_KEYS = frozenset({"input", "model", "max_tokens", "overlap"})
TOKENIZE_KEYS = frozenset({"input", "model", "prompt"})


def embedd_chunk(body: Mapping[str, Any], limits: Limits) -> Chunk:
    """`POST /v1/chunk`: the msgpack `chunk` op's fields and checks."""
    _check_keys(body, CHUNK_KEYS)
    args = {k: v for k, v in body.items() if v is not None}
    return Chunk.parse(args, limits)


def embedd_tokenize(body: Mapping[str, Any], limits: Limits) -> Tokenize:
    """`POST /v1/tokenize`: the msgpack `tokenize` op's fields and checks."""
    _check_keys(body, TOKENIZE_KEYS)
    args = {k: v for k, v in body.items() if v is not None}
    return Tokenize.parse(args, limits)


# A `/v1/chunk` answer's size, estimated before any work (for the connection's answer budget,
# as the msgpack socket estimates its own): the body carries the text JSON-escaped once; the
# answer repeats it in its chunks (overlap repeats less than half of it again) with each
# chunk's span and count, small next to its text.
_CHUNK_ANSWER_FACTOR = 3


def chunk_answer_bytes(body_bytes: int) -> int:
    return _ENVELOPE_BYTES + _CHUNK_ANSWER_FACTOR * body_bytes


# --- rerank: llama-server / Jina / Cohere, and text-embeddings-inference ----------------------
# Two shapes of one request. `POST /v1/rerank` (llama-server's route, the shape Jina's API and
# Cohere's v1 API share) and `POST /v2/rerank` (Cohere's v2, which LangChain's CohereRerank
# calls): {model, query, documents, top_n, return_documents} -> {results: [{index,
# relevance_score, document?}], model, usage}. `POST /rerank` is TEI's: {query, texts,
# raw_scores, return_text, truncate} -> [{index, score, text?}]. Both score with the model's
# raw logit where their reference server does: llama-server returns the logit as
# `relevance_score`; TEI returns its sigmoid unless `raw_scores` is true. TEI's route refuses
# in TEI's shape (`tei_error`).

RERANK_KEYS = frozenset(
    {"model", "query", "documents", "top_n", "return_documents"}
    # Cohere's: embedd never cuts a document (a long one is scored in pieces, as its best
    # piece), so a token cap per document is accepted and has nothing to cut; `priority` is
    # Cohere's number, unrelated to embedd's lanes, and accepted unused.
    | {"max_tokens_per_doc", "max_chunks_per_doc", "rank_fields", "priority"}
)
TEI_RERANK_KEYS = frozenset(
    {"query", "texts", "raw_scores", "return_text", "truncate", "truncation_direction", "model"}
)


def _document_text(doc: Any) -> Any:
    """A document as Jina and Cohere send it: a string, or an object with its `text`."""
    if isinstance(doc, Mapping) and isinstance(doc.get("text"), str):
        return doc["text"]
    return doc


def rerank(body: Mapping[str, Any], limits: Limits) -> Rerank:
    """`POST /v1/rerank`, `POST /v2/rerank` -> the typed request (its checks are the msgpack
    op's). Raises EmbeddError (-> openai_error)."""
    _check_keys(body, RERANK_KEYS)
    if "model" not in body:
        raise _bad("model is required", "model")
    args: dict[str, Any] = {"model": body["model"]}
    for key in ("query", "top_n", "return_documents"):
        if body.get(key) is not None:
            args[key] = body[key]
    documents = body.get("documents")
    if isinstance(documents, list):
        args["documents"] = [_document_text(d) for d in documents]
    elif documents is not None:
        args["documents"] = documents
    return Rerank.parse(args, limits)


def rerank_json(call: Rerank, answer: RerankAnswer) -> bytes:
    """The llama-server / Jina / Cohere answer: results best first, each document (if asked)
    as `{"text": ...}`, and the tokens read as usage."""
    results = []
    for r in answer.results:
        item: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        if r.document is not None:
            item["document"] = {"text": r.document}
        results.append(item)
    tokens = answer.usage.prompt_tokens
    return _json_text(
        {
            "id": str(uuid.uuid4()),
            "object": "list",
            "model": call.model,
            "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "meta": {"billed_units": {"input_tokens": tokens}},
            "embedd": {"pieces": {str(i): n for i, n in enumerate(answer.pieces) if n > 1}},
        }
    )


@dataclass(frozen=True)
class TeiRerank:
    request: Rerank
    raw_scores: bool


def tei_rerank(body: Mapping[str, Any], limits: Limits) -> TeiRerank:
    """TEI's `POST /rerank` -> the typed request, on the model named "default" unless the
    body names another (`model`, an extra: TEI serves one model). `truncate` is accepted and
    changes nothing: embedd never cuts a document (a long one is scored in pieces)."""
    _check_keys(body, TEI_RERANK_KEYS)
    flags = {}
    for key in ("raw_scores", "return_text", "truncate"):
        value = body.get(key, False)
        if not isinstance(value, bool):
            raise _bad(f"{key} must be true or false", key)
        flags[key] = value
    args: dict[str, Any] = {"model": body.get("model") or "default"}
    if "query" in body:
        args["query"] = body["query"]
    if "texts" in body:
        args["documents"] = body["texts"]
    try:
        request = Rerank.parse({**args, "return_documents": flags["return_text"]}, limits)
    except EmbeddError as exc:
        # TEI's own names for what was wrong.
        if exc.details.get("key") == "documents":
            exc = EmbeddError(
                exc.code,
                exc.message.replace("documents", "texts"),
                **{**exc.details, "key": "texts"},
            )
        raise exc from None
    return TeiRerank(request, flags["raw_scores"])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def tei_rerank_json(call: TeiRerank, answer: RerankAnswer) -> bytes:
    """TEI's answer: `[{index, score, text?}]`, best first; the score is the logit's sigmoid
    unless `raw_scores`."""
    rows = []
    for r in answer.results:
        row: dict[str, Any] = {
            "index": r.index,
            "score": r.score if call.raw_scores else _sigmoid(r.score),
        }
        if r.document is not None:
            row["text"] = r.document
        rows.append(row)
    return _json_text(rows)


def _json_text(value: Any) -> bytes:
    """JSON with text as UTF-8 (documents echoed back are not inflated sixfold by escapes)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
