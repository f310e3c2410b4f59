"""Writes `tests/data/st_quantized.npz`: sentence-transformers' own `quantize_embeddings`
(`sentence_transformers/util/quantization.py`) applied
to the reference vectors (`st_queries.npy`, `st_chunks.npy`) and to a few edge rows, for
`binary` and `ubinary`.

sentence-transformers needs PyTorch, which the project's environment never installs, so this
runs once in an environment of its own, and its output is committed:

    python3.11 -m venv /tmp/st-venv
    /tmp/st-venv/bin/pip install torch sentence-transformers   # (a CPU build of torch will do)
    PYTHONPATH=. /tmp/st-venv/bin/python -m tests.st_quantized

tests/test_precision.py checks embedd's packing against these bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
OUTPUT = DATA / "st_quantized.npz"
SETS = {"queries": "st_queries.npy", "chunks": "st_chunks.npy"}
PRECISIONS = ("binary", "ubinary")


def edge_vectors() -> np.ndarray:
    """Rows that the reference vectors never hold: zeros of both signs (the threshold is
    `> 0`), the smallest subnormals, and 13 components (the last byte padded)."""
    tiny = np.float32(1e-45)
    rows = [
        [0.0, -0.0, tiny, -tiny, 1.0, -1.0, 0.5, -0.5, 0.0, 2.0, -2.0, 3.0, 0.0],
        [1.0] * 13,
        [-1.0] * 13,
        [0.0] * 13,
        [-0.0] * 13,
    ]
    return np.array(rows, dtype=np.float32)


def main() -> None:
    # Installed only in the separate environment above.
    import sentence_transformers  # type: ignore[import-not-found]
    from sentence_transformers.util.quantization import (  # type: ignore[import-not-found]
        quantize_embeddings,
    )

    arrays: dict[str, np.ndarray] = {}
    for name, file in SETS.items():
        vectors = np.load(DATA / file)
        for precision in PRECISIONS:
            arrays[f"{name}_{precision}"] = np.asarray(quantize_embeddings(vectors, precision))
    arrays["edge"] = edge_vectors()
    for precision in PRECISIONS:
        arrays[f"edge_{precision}"] = np.asarray(quantize_embeddings(arrays["edge"], precision))
    arrays["version"] = np.array(sentence_transformers.__version__)
    np.savez_compressed(OUTPUT, **arrays)  # type: ignore[arg-type]
    print(f"wrote {OUTPUT} with sentence-transformers {sentence_transformers.__version__}")


if __name__ == "__main__":
    main()
