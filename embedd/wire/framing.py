"""The wire protocol as a pure object: bytes in, messages out, no I/O.

A frame is a 4-byte big-endian length N followed by N bytes of one msgpack map. The server
feeds whatever bytes arrive into `FrameDecoder.feed` and gets back complete messages or a
fatal `FrameError`; it encodes answers with `encode_frame`. Keeping this free of sockets lets
the tests cut a stream at every byte boundary without a daemon.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .errors import Code

PROTOCOL_VERSION = 1
# 64 MiB: a request of 100,000 inputs of a few hundred bytes each fits, and a single frame can
# never make the daemon hold more than this in one buffer.
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
_PREFIX = struct.Struct(">I")
PREFIX_SIZE = _PREFIX.size


@dataclass(frozen=True)
class FrameError:
    """The stream broke: answer with this code (id unknown), then close the connection.

    A length prefix or an undecodable body leaves no way to find the next frame boundary that
    could be trusted, so these are always fatal for the connection.
    """

    code: Code
    message: str
    limit: int | None = None


Message = dict[str, Any]


def encode_frame(message: Message) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return _PREFIX.pack(len(body)) + body


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Maps have str keys, each once (PROTOCOL.md): anything else is a broken message, not a
    request with a surprising key (msgpack would take the last of duplicate keys silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise ValueError(f"map keys must be strings, got a {type(key).__name__} key")
        if key in out:
            raise ValueError(f"map key {key[:80]!r} appears twice")
        out[key] = value
    return out


def decode_body(body: bytes) -> Message:
    """Decode one frame body; raises ValueError naming what is wrong.

    `unpackb` limits every container to len(body), so a length-checked body cannot make it
    allocate more than the frame limit already allows. Strings that are not valid UTF-8 decode
    with `surrogateescape`: the frame itself is whole, so the request they are in is refused by
    name (`bad_request` for that input) instead of closing the connection.
    """
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            timestamp=0,
            unicode_errors="surrogateescape",
            object_pairs_hook=_strict_map,
        )
    except msgpack.ExtraData as exc:
        raise ValueError("frame body holds more than one msgpack object") from exc
    except (msgpack.FormatError, msgpack.StackError) as exc:
        raise ValueError(f"frame body is not valid msgpack: {exc}") from exc
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"frame body is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"frame body must be a msgpack map, got {type(obj).__name__}")
    return obj


class FrameDecoder:
    """Reassembles frames from arbitrary chunks of a byte stream.

    After a `FrameError` the decoder is closed: it returns nothing more, because the bytes that
    follow cannot be framed reliably.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message | FrameError]:
        if self._closed:
            return []
        self._buf += data
        out: list[Message | FrameError] = []
        while len(self._buf) >= PREFIX_SIZE:
            (length,) = _PREFIX.unpack_from(self._buf)
            if length > self.max_frame:
                out.append(
                    FrameError(
                        Code.FRAME_TOO_LARGE,
                        f"frame of {length} bytes exceeds the maximum of {self.max_frame} bytes",
                        limit=self.max_frame,
                    )
                )
                return self._close(out)
            if length == 0:
                out.append(FrameError(Code.PROTOCOL_ERROR, "frame of length 0 holds no message"))
                return self._close(out)
            end = PREFIX_SIZE + length
            if len(self._buf) < end:
                break
            body = bytes(self._buf[PREFIX_SIZE:end])
            del self._buf[:end]
            try:
                out.append(decode_body(body))
            except ValueError as exc:
                out.append(FrameError(Code.PROTOCOL_ERROR, str(exc)))
                return self._close(out)
        return out

    def _close(self, out: list[Message | FrameError]) -> list[Message | FrameError]:
        self._closed = True
        self._buf.clear()
        return out
