"""Compact vectors: the `precision` an embedding answer is given in, and the one statement of
how a float32 vector becomes each (pure: numpy, no I/O).

Vector stores keep compact vectors: half-precision floats, or one sign bit per component
packed 8 to a byte, which is what Hamming-distance indexes (FAISS's binary indexes, usearch,
Qdrant's and Weaviate's binary quantization) search. The bit layouts are exactly those of
sentence-transformers' `quantize_embeddings`, so vectors stored by one load with the other:

- `ubinary`: `numpy.packbits(v > 0)`: bit 1 for a component strictly above zero (0.0 and -0.0
  are 0), the first component in the highest bit of the first byte, the last byte padded with
  zero bits; uint8.
- `binary`: the same bytes less 128, as int8 (-128..127): `(ubinary - 128).astype(int8)`.
- `float16`: `v.astype(float16)` (round to nearest even).

A sign bit does not change when a vector is scaled by a positive number, so the bits of a
normalized vector are the bits of the unnormalized one (`normalize` changes only the float
precisions). The cache holds float32 vectors: a text asked for in two precisions is computed
once.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

Precision = Literal["float32", "float16", "binary", "ubinary"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# Each precision's element type as stored and sent: little-endian where it has an order.
DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "binary": "i1",
    "ubinary": "u1",
}


def is_packed(precision: str) -> bool:
    """Whether `precision` packs 8 components to a byte (one element per 8 dimensions)."""
    return precision in ("binary", "ubinary")


def row_width(precision: str, dim: int) -> int:
    """Elements per vector of `dim` components: `dim`, or ceil(dim / 8) bytes packed."""
    return (dim + 7) // 8 if is_packed(precision) else dim


def element_bytes(precision: str) -> int:
    """Bytes of one element (a float, or a byte holding 8 signs)."""
    return int(np.dtype(DTYPES[precision]).itemsize)


def component_bytes(precision: str) -> float:
    """Bytes per vector component as raw bytes: 4, 2, or 1/8 packed."""
    return element_bytes(precision) / (8 if is_packed(precision) else 1)


def quantize(vectors: npt.NDArray[np.float32], precision: str) -> npt.NDArray[Any]:
    """`vectors` (rows of float32) in `precision`, as sentence-transformers' definition."""
    if precision == "float32":
        return vectors
    if precision == "float16":
        return vectors.astype(np.float16)
    bits = np.packbits(vectors > 0, axis=-1)
    if precision == "ubinary":
        return bits
    if precision == "binary":
        return (bits.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"unknown precision {precision!r}")


def to_bytes(vectors: npt.NDArray[np.float32], precision: str) -> bytes:
    """The rows in `precision` as one little-endian, row-major run of bytes."""
    compact = quantize(vectors, precision)
    dtype = DTYPES[precision]
    return np.ascontiguousarray(compact, dtype=dtype).tobytes()
