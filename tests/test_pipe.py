"""The pipe between the daemon and a model process, as a pure object: typed messages in, frames
out, and back; nothing that is not a message gets through."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from embedd.inference.pipe import (
    MAX_PIPE_FRAME,
    Compute,
    Computed,
    Hello,
    Load,
    Loaded,
    LogLine,
    Message,
    ModelInfo,
    PipeDecoder,
    PipeError,
    TokenizerSpec,
    WordPieceSpec,
    encode,
)

SPEC = TokenizerSpec(
    head=[101],
    tail=[102],
    max_tokens=256,
    longest_piece=18,
    nfc=False,
    trailing_space=None,
    space_probe=[1037, 1037],
    wordpiece=WordPieceSpec(["[PAD]", "[UNK]", "a"], True, "[UNK]", ["[PAD]"]),
)
MESSAGES: list[Message] = [
    Hello(123, "llama-cpp-python 0.3.36", "CPU : AVX2 = 1"),
    Load("/m.gguf", 256, None, None, 384, "mean", None, None, 2, True),
    Loaded(ModelInfo(384, "mean", 512, 1000, 256, 256, 64, card={"architecture": "bert"}), SPEC, 2),
    Compute(7, 1, 2, [3, 2], np.asarray([101, 5, 102, 101, 102], "<i4").tobytes()),
    Computed(7, np.ones((2, 4), "<f4").tobytes(), 0.004),
    LogLine(20, "embedd.llama", "loaded"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_comes_out_as_it_went_in(message: Message) -> None:
    assert PipeDecoder().feed(encode(message)) == [message]


def test_frames_split_anywhere_come_out_whole_and_in_order() -> None:
    stream = b"".join(encode(m) for m in MESSAGES)
    decoder = PipeDecoder()
    out: list[Message] = []
    for i in range(0, len(stream), 7):
        out += decoder.feed(stream[i : i + 7])
    assert out == MESSAGES


def test_vectors_cross_as_raw_float32_bytes() -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 384)).astype("<f4")
    frame = encode(Computed(1, vectors.tobytes(), 0.0))
    # The frame is the bytes themselves plus a few of framing, not an encoding per component.
    assert len(frame) < vectors.nbytes + 64
    (back,) = PipeDecoder().feed(frame)
    assert isinstance(back, Computed)
    assert np.array_equal(np.frombuffer(back.vectors, "<f4").reshape(3, 384), vectors)


def test_a_frame_over_the_limit_is_refused_before_it_is_read() -> None:
    with pytest.raises(PipeError, match="over the pipe"):
        PipeDecoder().feed(struct.pack(">I", MAX_PIPE_FRAME + 1))


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\x93\x01\x02\x03", b"\x91\xa4Nope", b"\x92\xa5Hello\x01"],
    ids=["not msgpack", "no name", "unknown name", "missing fields"],
)
def test_a_frame_that_is_not_a_message_is_an_error(body: bytes) -> None:
    with pytest.raises(PipeError):
        PipeDecoder().feed(struct.pack(">I", len(body)) + body)
