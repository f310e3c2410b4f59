"""embedd on a Ray cluster: one daemon per node, Ray Data steps that chunk and embed through it,
and outputs a rerun can resume. An optional extra, installed from a clone of embedd with
`pip install '.[ray]'` (the distribution is not published): the rest of the package never
imports Ray.

    from embedd.ray import Embed, EmbedSettings, NodeDaemons, unembedded, written_once

The vectors are the desktop daemon's: the same GGUF, tokenizer and llama.cpp compute them, and
each row says which (`model_fingerprint`). docs/ray.md has the example.
"""

from embedd.ray.columns import EmbedSettings
from embedd.ray.nodes import Daemons, NodeDaemons
from embedd.ray.progress import DaemonProgress
from embedd.ray.resume import OutputMismatch, RowsMissing, Tally, done_ids, unembedded, written_once
from embedd.ray.retry import GaveUp, Patience
from embedd.ray.steps import Chunk, Embed
from embedd.ray.supervisor import DaemonStartError

__all__ = [
    "Chunk",
    "DaemonProgress",
    "DaemonStartError",
    "Daemons",
    "Embed",
    "EmbedSettings",
    "GaveUp",
    "NodeDaemons",
    "OutputMismatch",
    "Patience",
    "RowsMissing",
    "Tally",
    "done_ids",
    "unembedded",
    "written_once",
]
