"""A deliberately independent, minimal protocol client for the tests: struct + msgpack straight
from PROTOCOL.md, so the daemon is checked against the spec rather than against its own code."""

from __future__ import annotations

import itertools
import socket
import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack  # type: ignore[import-untyped]


class RawConnection:
    def __init__(self, path: Path, timeout: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        # Far from the small ids tests send by hand on the same connection.
        self._ids = itertools.count(1_000_000)
        self._stash: dict[Any, dict[str, Any]] = {}

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def next_id(self) -> int:
        return next(self._ids)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, message: dict[str, Any]) -> None:
        body = msgpack.packb(message, use_bin_type=True)
        self.sock.sendall(struct.pack(">I", len(body)) + body)

    def request(self, op: str, **args: Any) -> int:
        rid = self.next_id()
        self.send({"id": rid, "op": op, **args})
        return rid

    def _read_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def recv(self) -> dict[str, Any]:
        (n,) = struct.unpack(">I", self._read_exact(4))
        msg: dict[str, Any] = msgpack.unpackb(self._read_exact(n), raw=False)
        return msg

    def recv_for(self, rid: Any) -> dict[str, Any]:
        """The response to `rid`, keeping others that arrive first for later calls."""
        if rid in self._stash:
            return self._stash.pop(rid)
        while True:
            msg = self.recv()
            if msg.get("id") == rid:
                return msg
            self._stash[msg.get("id")] = msg

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        return self.recv_for(self.request(op, **args))

    def is_closed_by_peer(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
