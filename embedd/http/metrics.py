"""`stats` in the Prometheus text format (exposition format 0.0.4), for `GET /metrics` and the
`--metrics-file` that node_exporter's textfile collector reads. Pure: a stats map in, text out.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (stats path, metric name, type, help). Per-model figures get a `model` label.
_DAEMON = [
    (("uptime",), "embedd_uptime_seconds", "gauge", "Seconds since the daemon started"),
    (("rss_bytes",), "embedd_resident_memory_bytes", "gauge", "Resident memory of the daemon"),
    (("connections", "open"), "embedd_connections_open", "gauge", "Open connections"),
    (("connections", "total"), "embedd_connections_total", "counter", "Connections accepted"),
    (("connections", "refused"), "embedd_connections_refused_total", "counter",
     "Connections refused at the door (busy, forbidden, shutting down)"),
    (("connections", "timed_out"), "embedd_connections_timed_out_total", "counter",
     "Connections closed for idling or stalling mid-frame"),
    (("requests", "total"), "embedd_requests_total", "counter", "Requests answered"),
    (("cache", "hits"), "embedd_cache_hits_total", "counter", "Vector cache hits"),
    (("cache", "misses"), "embedd_cache_misses_total", "counter", "Vector cache misses"),
    (("cache", "bytes"), "embedd_cache_bytes", "gauge", "Bytes held by the vector cache"),
]  # fmt: skip
_MODEL: list[tuple[str | tuple[str, ...], str, str, str]] = [
    ("requests", "embedd_model_requests_total", "counter",
     "Embed and rerank requests that reached the model"),
    ("reranks", "embedd_model_reranks_total", "counter", "Rerank requests that reached the model"),
    ("pairs", "embedd_model_rerank_pairs_total", "counter",
     "Query/document pairs computed for rerank requests"),
    ("inputs", "embedd_model_inputs_total", "counter", "Inputs computed"),
    ("tokens", "embedd_model_tokens_total", "counter", "Tokens computed"),
    ("batches", "embedd_model_batches_total", "counter", "llama batches run"),
    ("cancelled", "embedd_model_cancelled_inputs_total", "counter",
     "Inputs dropped before computing (cancelled, timed out, client gone)"),
    ("queue_inputs", "embedd_model_queue_inputs", "gauge", "Inputs waiting for the model"),
    ("queue_tokens", "embedd_model_queue_tokens", "gauge", "Tokens waiting for the model"),
    ("busy_fraction", "embedd_model_busy_fraction", "gauge",
     "Share of the last minute the model's replicas spent computing (their mean)"),
    ("loads", "embedd_model_loads_total", "counter", "Times the model was loaded"),
    ("unloads", "embedd_model_unloads_total", "counter", "Times the model was unloaded"),
    (("process", "crashes"), "embedd_model_process_crashes_total", "counter",
     "Times the model's process (where llama.cpp runs) died"),
    (("process", "restarts"), "embedd_model_process_restarts_total", "counter",
     "Times the model's process was started again after dying"),
    (("process", "poison_inputs_found"), "embedd_model_poison_inputs_found_total", "counter",
     "Inputs found to kill the model (answered model_crashed)"),
    (("process", "poison_inputs_refused"), "embedd_model_poison_inputs_refused_total", "counter",
     "Inputs refused at once because they had killed the model"),
    (("process", "rss_bytes"), "embedd_model_process_resident_bytes", "gauge",
     "Resident memory of the model's process"),
]  # fmt: skip
_LATENCY = [
    ("queue_wait", "embedd_model_queue_wait_seconds", "Time from arrival to computing, recent"),
    ("compute", "embedd_model_compute_seconds", "Time computing a request's batches, recent"),
    ("total", "embedd_model_latency_seconds", "Request latency inside the model, recent"),
]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _get(stats: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = stats
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _lines(stats: Mapping[str, Any]) -> Iterator[str]:
    for path, name, kind, text in _DAEMON:
        value = _number(_get(stats, path))
        if value is not None:
            yield f"# HELP {name} {text}\n# TYPE {name} {kind}\n{name} {value:g}"
    errors = _get(stats, ("requests", "errors")) or {}
    yield "# HELP embedd_request_errors_total Requests answered with an error, by code"
    yield "# TYPE embedd_request_errors_total counter"
    for code, count in sorted(errors.items()):
        yield f'embedd_request_errors_total{{code="{_label(str(code))}"}} {count}'
    models: Mapping[str, Any] = stats.get("models") or {}
    for key, name, kind, text in _MODEL:
        yield f"# HELP {name} {text}\n# TYPE {name} {kind}"
        for model, figures in sorted(models.items()):
            value = _number(_get(figures, key if isinstance(key, tuple) else (key,)))
            if value is not None:
                yield f'{name}{{model="{_label(model)}"}} {value:g}'
    for key, name, text in _LATENCY:
        yield f"# HELP {name} {text}\n# TYPE {name} summary"
        for model, figures in sorted(models.items()):
            quantiles = (figures.get("latency_ms") or {}).get(key) or {}
            for q in ("p50", "p95", "p99"):
                value = _number(quantiles.get(q))
                if value is not None:
                    labels = f'model="{_label(model)}",quantile="{int(q[1:]) / 100}"'
                    yield f"{name}{{{labels}}} {value / 1000:g}"


def render(stats: Mapping[str, Any]) -> str:
    return "\n".join(_lines(stats)) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write then rename, so a collector never reads half a file (node_exporter's rule)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
