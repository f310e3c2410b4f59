"""The callable classes Ray Data runs (`Dataset.map_batches(Embed, batch_format="pyarrow",
...)`): `Chunk` cuts documents with the daemon's `chunk` op (the model's own tokenizer and
limit), `Embed` embeds rows at bulk priority. One instance per Ray actor, each talking to the
daemon of the node it runs on, through a client that waits out `busy` and daemon restarts
(embedd/ray/retry.py), so neither reaches Ray as a failure.
"""

from __future__ import annotations

from typing import Any

import embedd_client
import pyarrow as pa

from embedd.index.records import model_fingerprint
from embedd.ray.columns import FILE, TEXT, EmbedSettings, chunked, embedded
from embedd.ray.nodes import Daemons, NodeLink
from embedd.ray.retry import DEFAULT_PATIENCE, GaveUp, Patience, PatientClient


def _texts(batch: pa.Table, step: str) -> list[str]:
    if TEXT not in batch.column_names:
        raise ValueError(f"{step} reads a `{TEXT}` column; the batch has {batch.column_names}")
    texts: list[str] = batch.column(TEXT).to_pylist()
    return texts


def _joined(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two `embed` answers for consecutive inputs as one."""
    out = dict(first)
    out["embeddings"] = first["embeddings"] + second["embeddings"]
    out["count"] = first["count"] + second["count"]
    for key in ("tokens", "truncated", "windows"):
        out[key] = list(first.get(key) or []) + list(second.get(key) or [])
    return out


class Embed:
    """Embeds a batch's `text` column on the node's daemon and returns the batch with the
    shared chunk record's columns (embedd/ray/columns.py: id, vector as
    `fixed_size_list<float32>[dim]`, model, model_fingerprint, tokens; `windows` with
    long="split"). `fingerprint`, when given (NodeDaemons.fingerprint), must be the node's:
    a node with another model file fails at start instead of writing other vectors.

    Texts must not be empty (the daemon refuses them: filter them out first). A batch larger
    than one client's share of the daemon's queue is sent in halves."""

    def __init__(
        self,
        daemons: Daemons | None = None,
        settings: EmbedSettings | None = None,
        *,
        fingerprint: str | None = None,
        patience: Patience = DEFAULT_PATIENCE,
    ) -> None:
        daemons = daemons or Daemons()
        self.settings = settings or EmbedSettings()
        self.client = PatientClient(NodeLink(daemons), patience, daemons.trust_uids)
        model = self.settings.model
        card = self.client.run(f"loading model {model!r}", lambda c, _: _card(c, model))
        self.fingerprint = model_fingerprint(card)
        self.dim = self.settings.dimensions or int(card["dim"])
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ValueError(
                f"model {model!r} on this node has fingerprint {self.fingerprint[:16]}, not "
                f"{fingerprint[:16]} as the driver's: give every node the same model file"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = _texts(batch, "Embed")
        result = (
            self._embed(texts)
            if texts
            else {"count": 0, "dim": self.dim, "embeddings": b"", "tokens": [], "windows": [],
                  "truncated": []}
        )  # fmt: skip
        return embedded(batch, result, fingerprint=self.fingerprint, settings=self.settings)

    def _embed(self, texts: list[str]) -> dict[str, Any]:
        args = self.settings.request()
        try:
            return self.client.run(
                f"embedding {len(texts)} texts",
                lambda c, left: c.request("embed", input=texts, timeout=left, **args),
            )
        except embedd_client.BusyError as exc:
            if len(texts) == 1:
                raise GaveUp(
                    f"one text is larger than the daemon takes from one client ({exc}); raise "
                    "the model's max_queue_tokens in the daemon's config"
                ) from exc
            half = len(texts) // 2
            return _joined(self._embed(texts[:half]), self._embed(texts[half:]))


def _card(client: embedd_client.Client, model: str) -> dict[str, Any]:
    client.load(model)
    for card in client.models():
        if card["name"] == model:
            return dict(card)
    raise ValueError(f"the node's daemon has no model {model!r}")


class Chunk:
    """Cuts each document of a batch (`file`: which document; `text`) into chunks with the
    daemon's `chunk` op: at most `max_tokens` tokens (default: the model's limit), `overlap`
    tokens shared by neighbours, at paragraph, sentence or word boundaries, counted by the
    model's own tokenizer. Returns a row per chunk: the document's other columns and `idx`,
    `start`, `end`, `line`, `text`, `tokens` (embedd/ray/columns.py), ready for `Embed`.
    Empty or blank documents give no chunks."""

    def __init__(
        self,
        daemons: Daemons | None = None,
        model: str = "default",
        *,
        max_tokens: int | None = None,
        overlap: int = 0,
        patience: Patience = DEFAULT_PATIENCE,
    ) -> None:
        daemons = daemons or Daemons()
        self.model = model
        self.max_tokens = max_tokens
        self.overlap = overlap
        self.client = PatientClient(NodeLink(daemons), patience, daemons.trust_uids)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = _texts(batch, "Chunk")
        if FILE not in batch.column_names:
            raise ValueError(f"Chunk needs a `{FILE}` column naming each document")
        return chunked(batch, [self._chunk(text) for text in texts])

    def _chunk(self, text: str | None) -> list[dict[str, Any]]:
        if not text or not text.strip():
            return []
        return self.client.run(
            f"chunking a text of {len(text)} characters",
            lambda c, _: c.chunk(text, self.model, self.max_tokens, self.overlap),
        )
