"""The wire protocol's error codes, and the one exception that carries them in the daemon."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Code(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNKNOWN_MODEL = "unknown_model"
    MODEL_LOAD_FAILED = "model_load_failed"
    # llama.cpp died computing an input (a native fault in the model process): the input that
    # kills it, or a model that keeps dying.
    MODEL_CRASHED = "model_crashed"
    INPUT_TOO_LONG = "input_too_long"
    BUSY = "busy"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    FRAME_TOO_LARGE = "frame_too_large"
    PROTOCOL_ERROR = "protocol_error"
    FORBIDDEN = "forbidden"
    INTERNAL = "internal"


class EmbeddError(Exception):
    """A failure that becomes an error response: a code, a message for humans, and details
    (`index`, `limit`, `tokens`, `retry_after`, `key`) for programs."""

    def __init__(self, code: Code, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_wire(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, **self.details}

    def __repr__(self) -> str:
        return f"EmbeddError({self.code.value!r}, {self.message!r}, {self.details!r})"
