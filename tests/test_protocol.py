"""The framing object alone: no socket, no daemon."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import msgpack  # type: ignore[import-untyped]

from embedd.wire.errors import Code
from embedd.wire.framing import FrameDecoder, FrameError, encode_frame

MESSAGES = [
    {"id": 1, "op": "hello"},
    {"id": 2, "op": "embed", "input": ["ä text", "another"], "normalize": False},
    {"id": 2**64 - 1, "op": "embed", "input": "x" * 300, "blob": b"\x00\x01"},
]


def _stream() -> bytes:
    return b"".join(encode_frame(m) for m in MESSAGES)


def test_frame_is_big_endian_length_then_msgpack_map() -> None:
    frame = encode_frame({"id": 1, "op": "hello"})
    (n,) = struct.unpack(">I", frame[:4])
    assert n == len(frame) - 4
    assert msgpack.unpackb(frame[4:]) == {"id": 1, "op": "hello"}


def test_stream_split_at_every_byte_boundary_yields_the_same_messages() -> None:
    data = _stream()
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        out = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert out == MESSAGES, cut
        assert decoder.buffered == 0


def test_stream_fed_one_byte_at_a_time_yields_the_same_messages() -> None:
    decoder = FrameDecoder()
    out = []
    for b in _stream():
        out += decoder.feed(bytes([b]))
    assert out == MESSAGES


def test_several_frames_in_one_read_are_all_returned_in_order() -> None:
    assert FrameDecoder().feed(_stream()) == MESSAGES


def test_oversize_length_prefix_is_frame_too_large_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=1000)
    out = decoder.feed(struct.pack(">I", 1001))
    assert len(out) == 1
    err = out[0]
    assert isinstance(err, FrameError)
    assert err.code == Code.FRAME_TOO_LARGE
    assert err.limit == 1000
    assert "1001" in err.message and "1000" in err.message


def test_frame_of_exactly_max_size_is_accepted() -> None:
    msg = {"id": 1, "op": "x" * 20}
    frame = encode_frame(msg)
    assert FrameDecoder(max_frame=len(frame) - 4).feed(frame) == [msg]


def test_garbage_after_a_valid_frame_keeps_the_frame_then_fails_closed() -> None:
    decoder = FrameDecoder()
    out = decoder.feed(encode_frame(MESSAGES[0]) + b"\x00\x00\x00\x03\xc1\xc1\xc1")
    assert out[0] == MESSAGES[0]
    assert isinstance(out[1], FrameError)
    assert out[1].code == Code.PROTOCOL_ERROR
    assert decoder.closed
    assert decoder.feed(encode_frame(MESSAGES[1])) == []


def test_random_bytes_after_a_valid_frame_never_yield_a_message() -> None:
    decoder = FrameDecoder(max_frame=4096)
    out = decoder.feed(encode_frame(MESSAGES[0]) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out[0] == MESSAGES[0]
    assert len(out) == 2 and isinstance(out[1], FrameError)
    assert out[1].code == Code.FRAME_TOO_LARGE  # "GET " read as a length prefix


def test_body_that_is_not_a_map_is_a_protocol_error() -> None:
    body = msgpack.packb([1, 2, 3])
    out = FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert isinstance(out[0], FrameError) and out[0].code == Code.PROTOCOL_ERROR
    assert "map" in out[0].message


def test_body_with_two_msgpack_objects_is_a_protocol_error() -> None:
    body = msgpack.packb({"id": 1}) + msgpack.packb({"id": 2})
    out = FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert isinstance(out[0], FrameError) and out[0].code == Code.PROTOCOL_ERROR


def test_invalid_utf8_in_a_whole_frame_decodes_with_escapes_for_the_request_to_refuse() -> None:
    body = b"\x81\xa2id\xa2\xff\xfe"
    out = FrameDecoder().feed(struct.pack(">I", len(body)) + body)
    assert out == [{"id": "\udcff\udcfe"}]


def test_zero_length_frame_is_a_protocol_error() -> None:
    out = FrameDecoder().feed(b"\x00\x00\x00\x00")
    assert isinstance(out[0], FrameError) and out[0].code == Code.PROTOCOL_ERROR


def test_incomplete_frame_waits_for_more_bytes() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(MESSAGES[1])
    assert decoder.feed(frame[:-1]) == []
    assert decoder.feed(frame[-1:]) == [MESSAGES[1]]


def test_protocol_md_worked_examples_are_the_real_bytes() -> None:
    text = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    blocks = re.findall(r"```\n([0-9a-f ]+)\n", text)
    assert len(blocks) >= 2
    expected = [
        encode_frame({"id": 1, "op": "hello"}),
        encode_frame({"id": 7, "op": "embed", "input": "hi", "encoding": "list"}),
    ]
    for block, frame in zip(blocks, expected, strict=False):
        assert bytes.fromhex(block) == frame
