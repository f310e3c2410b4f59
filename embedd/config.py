"""Daemon configuration: defaults, the TOML file and command-line overrides.

Everything the daemon can be told lives in one frozen `Config`, built once at start-up, so the
rest of the code never reads the environment or the file system for settings.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .wire.framing import DEFAULT_MAX_FRAME
from .wire.messages import DEFAULT_MODEL
from .wire.options import LONG_MODES

BUNDLED_MODEL = Path(__file__).resolve().parent / "bundled" / "all-MiniLM-L6-v2-f16.gguf"
# The bundled model was trained with max_seq_length 256 (sentence-transformers'
# sentence_bert_config.json); its GGUF header says 512, but longer inputs give vectors the
# reference implementation never produces.
BUNDLED_MAX_TOKENS = 256

# What the HTTP APIs may do with an over-long input a request says nothing about: any of the
# modes a request may name.
HTTP_LONG_MODES = LONG_MODES
# What the engine can serve: "none" gives per-token vectors and "rank" a reranker's score.
POOLING_NAMES = ("mean", "cls", "last")


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file, key and reason."""


@dataclass(frozen=True)
class ModelConfig:
    """One servable model."""

    name: str
    path: Path
    # None: take the context length from the GGUF header.
    max_tokens: int | None = None
    # None: use the pooling type the GGUF declares.
    pooling: str | None = None
    # Compute threads; None: chosen per batch from the free cores (see threads.py).
    threads: int | None = None
    # llama contexts over the one copy of the weights, each computing its own batches; None:
    # one per usable core, or per `threads` cores (see threads.py).
    replicas: int | None = None
    # Tokens per llama batch. Every input must fit in one (non-causal models attend over the
    # whole sequence at once), so the effective value is at least max_tokens. Measured here
    # (MiniLM f16, flash attention, 2 threads): 256 gives the same bulk throughput as 512 and
    # more queries/s, and halves how long a query can wait behind a batch being computed.
    batch_tokens: int = 256
    # Bound of the model's queue, in tokens of accepted but not yet computed inputs.
    max_queue_tokens: int = 1_000_000
    # Layers offloaded to a GPU; None: all of them if llama.cpp was built with GPU offload.
    gpu_layers: int | None = None
    # The dimension a vector store expects: a model file of another one refuses to load.
    dim: int | None = None
    # Seconds idle before the model unloads itself; 0 keeps it loaded forever.
    keep_alive: float = 300.0
    prompts: Mapping[str, str] = field(default_factory=dict)
    # Other names requests may use for this model: one loaded copy answers all of them.
    aliases: tuple[str, ...] = ()
    # What the HTTP APIs do with an input over max_tokens when the request does not say:
    # "split" (windows, mean-pooled: the whole text counts), "truncate" or "error". Split lets
    # apps whose chunkers count characters (LangChain, LlamaIndex, Chroma) ingest unchanged.
    http_long: str = "split"


@dataclass(frozen=True)
class Config:
    socket: Path
    models: Mapping[str, ModelConfig]
    max_frame: int = DEFAULT_MAX_FRAME
    # The largest answer a request may get, known before any work (inputs x dim x 4 bytes for
    # f32): the same 64 MiB as a frame, so a client sized for max_frame reads every answer.
    max_response: int = DEFAULT_MAX_FRAME
    # Unsent answer bytes a connection may have queued before the daemon stops reading its
    # requests (backpressure for a client that does not read): 4 MiB is ~2,700 vectors of 384.
    max_unsent: int = 4 * 1024 * 1024
    # Seconds a connection with nothing in flight may stay silent before it is closed.
    idle_timeout: float = 300.0
    # Seconds a started frame may take to arrive whole (a stalled sender pins its buffer).
    frame_timeout: float = 30.0
    # Seconds SIGTERM waits for accepted work before answering the rest `shutting_down`;
    # below systemd's default TimeoutStopSec of 90 s.
    shutdown_grace: float = 30.0
    max_connections: int = 64
    max_inflight: int = 256
    max_inputs: int = 100_000
    request_timeout: float = 120.0
    # Seconds a model process may take to start, load its weights and compute its first batch
    # before it counts as hung (killed; the load fails naming this key), counted from when the
    # daemon has identified the file (its hash, read once per version of it). Reading 20 GB
    # of weights from a disk of 100 MB/s takes under 4 minutes; a load past 10 is stuck (a
    # file on a network share that stopped answering), not slow.
    load_timeout: float = 600.0
    allow_shutdown: bool = False
    # Bytes of vectors and texts the LRU cache may hold (0 turns it off). 16 MiB holds about
    # 8,000 vectors of 384 dimensions with their texts; it adds to the resident memory.
    cache_bytes: int = 16 * 1024 * 1024
    # `embed` requests with more inputs than this are bulk work unless they name a priority.
    bulk_threshold: int = 8
    source: Path | None = None
    # Who may connect besides the daemon's own uid and root (see peercred.py).
    allow_uids: tuple[int, ...] = ()
    allow_gid: int | None = None
    # Seconds without any connection after which a socket-activated daemon exits (0: never).
    idle_exit: float = 0.0
    # Models loaded at start-up, before the daemon tells the service manager it is ready.
    preload: tuple[str, ...] = ()
    # The HTTP front (off unless one of the two is set): a Unix socket, and/or HOST:PORT.
    http_socket: Path | None = None
    http: str | None = None
    # TCP needs a bearer key from this file (created with a random key if missing), unless
    # `no_api_key` says to serve without one; non-loopback hosts need `http_allow_remote`.
    api_key_file: Path | None = None
    no_api_key: bool = False
    http_allow_remote: bool = False
    # Web origins whose pages may call the HTTP API from a browser ("*": any); none by default,
    # so a page the user happens to visit cannot reach the local daemon.
    cors_origins: tuple[str, ...] = ()
    # Where to write `stats` in the Prometheus text format, every `metrics_every` seconds.
    metrics_file: Path | None = None
    metrics_every: float = 15.0
    # "text" (one line per event) or "json" (one JSON object per line).
    log_format: str = "text"


def fit_to_cores(config: Config, cores: int) -> tuple[Config, list[str]]:
    """`config` with each model's `threads` and `replicas` cut to `cores` (the usable cores:
    threads.machine_cpus), and a sentence for the log per value cut. More compute threads
    than cores only wait for each other at llama.cpp's barriers (1,024 threads on 2 cores:
    query p50 674 ms); a replica beyond the cores never computes, since each decode holds at
    least one core of the budget, and holds its compute buffers for nothing (256 replicas of
    the bundled model on 2 cores: 2.3 GB)."""
    notes: list[str] = []

    def fit(name: str, key: str, value: int | None) -> int | None:
        if value is None or value <= cores:
            return value
        notes.append(
            f"model {name!r}: {key} = {value} is more than the {cores} usable cores "
            f"(the affinity mask and the cgroup quota); using {cores}"
        )
        return cores

    models = {
        name: replace(
            model,
            threads=fit(name, "threads", model.threads),
            replicas=fit(name, "replicas", model.replicas),
        )
        for name, model in config.models.items()
    }
    return replace(config, models=models), notes


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """The socket path when none is given: $EMBEDD_SOCKET, the runtime dir, else /tmp/embedd-UID."""
    env = os.environ if env is None else env
    if env.get("EMBEDD_SOCKET"):
        return Path(env["EMBEDD_SOCKET"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "embedd" / "embedd.sock"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(f"/tmp/embedd-{uid}") / "embedd.sock"


def default_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("EMBEDD_CONFIG"):
        return Path(env["EMBEDD_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "embedd" / "config.toml"


_TOP_KEYS = {
    "socket": str,
    "max_frame": int,
    "max_response": int,
    "max_unsent": int,
    "idle_timeout": (int, float),
    "frame_timeout": (int, float),
    "shutdown_grace": (int, float),
    "max_connections": int,
    "max_inflight": int,
    "max_inputs": int,
    "request_timeout": (int, float),
    "load_timeout": (int, float),
    "allow_shutdown": bool,
    "cache_bytes": int,
    "bulk_threshold": int,
    "models": dict,
    "allow_uids": list,
    "allow_gid": (int, str),
    "idle_exit": (int, float),
    "preload": list,
    "http_socket": str,
    "http": str,
    "api_key_file": str,
    "no_api_key": bool,
    "http_allow_remote": bool,
    "cors_origins": list,
    "metrics_file": str,
    "metrics_every": (int, float),
    "log_format": str,
}
_MODEL_KEYS = {
    "path": str,
    "max_tokens": int,
    "pooling": str,
    "threads": int,
    "replicas": int,
    "batch_tokens": int,
    "max_queue_tokens": int,
    "keep_alive": (int, float),
    "prompts": dict,
    "gpu_layers": int,
    "dim": int,
    "aliases": list,
    "http_long": str,
}


def _check_keys(table: Mapping[str, Any], allowed: Mapping[str, Any], where: str) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(allowed))})")
        expected = allowed[key]
        # bool is an int subclass: refuse True where a number is meant.
        if isinstance(value, bool) and expected is not bool:
            raise ConfigError(f"{where}: {key} must be {_type_name(expected)}, not a boolean")
        if not isinstance(value, expected):
            raise ConfigError(
                f"{where}: {key} must be {_type_name(expected)}, not {type(value).__name__}"
            )


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return "a number" if float in expected else "an integer or a name"
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "a table", list: "a list"}
    return names[expected]


# Every numeric key's sane range (inclusive): values outside are typos or would exhaust memory
# (batch_tokens = 2**31 asked llama.cpp for 8.8 GB on first use; max_frame = 3 fits no request).
_RANGES: dict[str, tuple[float, float]] = {
    "max_frame": (1024, 1 << 30),
    "max_response": (1024, 1 << 32),
    "max_unsent": (64 * 1024, 1 << 30),
    "max_connections": (1, 100_000),
    "max_inflight": (1, 100_000),
    "max_inputs": (1, 10_000_000),
    "request_timeout": (0.001, 3600.0),
    "load_timeout": (0.1, 86400.0),
    "idle_timeout": (0.1, 7 * 86400.0),
    "frame_timeout": (0.1, 3600.0),
    "shutdown_grace": (0.0, 3600.0),
    "cache_bytes": (0, 1 << 40),
    "bulk_threshold": (0, 10_000_000),
    "idle_exit": (0, 7 * 86400.0),
    "max_tokens": (4, 1 << 20),
    "threads": (1, 1024),
    # Each replica holds its own compute buffers (docs/performance.md, "Memory").
    "replicas": (1, 256),
    "batch_tokens": (4, 1 << 20),
    "max_queue_tokens": (1, 1 << 40),
    "keep_alive": (0, 10 * 365 * 86400.0),
    "metrics_every": (1.0, 86400.0),
    "gpu_layers": (0, 10_000),
    "dim": (1, 1 << 16),
}
LOG_FORMATS = ("text", "json")


def _in_range(value: float, key: str, where: str) -> None:
    low, high = _RANGES[key]
    if not (math.isfinite(value) and low <= value <= high):
        raise ConfigError(
            f"{where}: {key} must be between {_number(low)} and {_number(high)}, got {value}"
        )


def _number(value: float) -> str:
    """A bound as people write it in the file: 1073741824, not 1.07374e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _positive(value: float, key: str, where: str, *, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}: {key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    _in_range(value, key, where)


def _model_from_table(name: str, table: Mapping[str, Any], base: Path, where: str) -> ModelConfig:
    _check_keys(table, _MODEL_KEYS, where)
    if "path" not in table:
        raise ConfigError(f"{where}: path is required")
    path = Path(os.path.expanduser(table["path"]))
    if not path.is_absolute():
        path = base / path
    pooling = table.get("pooling")
    if pooling is not None and pooling not in POOLING_NAMES:
        raise ConfigError(
            f"{where}: pooling must be one of {', '.join(POOLING_NAMES)}, got {pooling!r}"
        )
    prompts = table.get("prompts", {})
    for pname, prefix in prompts.items():
        if not isinstance(prefix, str):
            raise ConfigError(f"{where}.prompts: {pname} must be a string")
    kwargs: dict[str, Any] = {}
    if "gpu_layers" in table:
        _positive(table["gpu_layers"], "gpu_layers", where, allow_zero=True)
        kwargs["gpu_layers"] = table["gpu_layers"]
    for key in ("max_tokens", "threads", "replicas", "batch_tokens", "max_queue_tokens", "dim"):
        if key in table:
            _positive(table[key], key, where)
            kwargs[key] = table[key]
    if "keep_alive" in table:
        _positive(table["keep_alive"], "keep_alive", where, allow_zero=True)
        kwargs["keep_alive"] = float(table["keep_alive"])
    if "http_long" in table:
        if table["http_long"] not in HTTP_LONG_MODES:
            raise ConfigError(
                f"{where}: http_long must be one of {', '.join(HTTP_LONG_MODES)}, "
                f"got {table['http_long']!r}"
            )
        kwargs["http_long"] = table["http_long"]
    if "aliases" in table:
        aliases = table["aliases"]
        if not all(isinstance(a, str) and a for a in aliases):
            raise ConfigError(f"{where}: aliases must be a list of model names (strings)")
        kwargs["aliases"] = tuple(aliases)
    return ModelConfig(name=name, path=path, pooling=pooling, prompts=dict(prompts), **kwargs)


def resolve_uid(value: int | str) -> int:
    """A uid from a number or a user name (KeyError if there is no such user)."""
    import pwd  # not on Windows

    return value if isinstance(value, int) else pwd.getpwnam(value).pw_uid


def resolve_gid(value: int | str) -> int:
    """A gid from a number or a group name (KeyError if there is no such group)."""
    import grp  # not on Windows

    return value if isinstance(value, int) else grp.getgrnam(value).gr_gid


def _service_keys(
    data: Mapping[str, Any], models: Mapping[str, ModelConfig], where: str
) -> dict[str, Any]:
    """`allow_uids`, `allow_gid`, `idle_exit` and `preload`: users and groups resolved to ids."""
    out: dict[str, Any] = {}
    uids = []
    for entry in data.get("allow_uids", []):
        if isinstance(entry, bool) or not isinstance(entry, int | str):
            raise ConfigError(f"{where}: allow_uids entries must be uids or user names")
        try:
            uids.append(resolve_uid(entry))
        except KeyError:
            raise ConfigError(f"{where}: allow_uids: no user named {entry!r}") from None
    if uids:
        out["allow_uids"] = tuple(uids)
    if "allow_gid" in data:
        try:
            out["allow_gid"] = resolve_gid(data["allow_gid"])
        except KeyError:
            raise ConfigError(f"{where}: allow_gid: no group named {data['allow_gid']!r}") from None
    if "idle_exit" in data:
        _positive(data["idle_exit"], "idle_exit", where, allow_zero=True)
        out["idle_exit"] = float(data["idle_exit"])
    preload = data.get("preload", [])
    for name in preload:
        if not isinstance(name, str) or name not in models:
            raise ConfigError(f"{where}: preload: no model named {name!r} is configured")
    if preload:
        out["preload"] = tuple(preload)
    return out


def _check_aliases(models: Mapping[str, ModelConfig], where: str) -> None:
    """Every name a request may use means one model: an alias that is also a model's name,
    or another model's alias, is refused (naming both)."""
    owner: dict[str, str] = {}
    for name, model in models.items():
        for alias in model.aliases:
            if alias in models and alias != name:
                raise ConfigError(f"{where}: alias {alias!r} of model {name!r} is a model's name")
            if owner.get(alias, name) != name:
                raise ConfigError(
                    f"{where}: alias {alias!r} is given to both {owner[alias]!r} and {name!r}"
                )
            owner[alias] = name


# What apps and libraries send when they assume the bundled model (all-MiniLM-L6-v2): Ollama's
# tag for it, Chroma's default ONNX model, and its Hugging Face names. OpenAI's own model names
# are not among them: their vectors live in another space, so answering them is the user's
# choice (docs/models.md, "Aliases").
BUNDLED_ALIASES = (
    "all-minilm",
    "all-minilm:l6-v2",
    "chroma/all-minilm-l6-v2-f32",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
)


def bundled_model() -> ModelConfig:
    return ModelConfig(
        name=DEFAULT_MODEL,
        path=BUNDLED_MODEL,
        max_tokens=BUNDLED_MAX_TOKENS,
        aliases=BUNDLED_ALIASES,
    )


def parse_model_option(option: str) -> ModelConfig:
    """`NAME=PATH` from `embedd serve --model`."""
    name, sep, path = option.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--model {option!r}: expected NAME=PATH")
    return ModelConfig(name=name, path=Path(os.path.expanduser(path)).resolve())


def load_config(
    path: Path | None = None,
    *,
    socket: Path | None = None,
    extra_models: tuple[ModelConfig, ...] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file (if any), then command-line options.

    An explicitly named file must exist; the default location is optional.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("EMBEDD_CONFIG"))
    path = path if path is not None else default_config_path(env)
    data: dict[str, Any] = {}
    source: Path | None = None
    if path.exists():
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        source = path
    elif explicit:
        raise ConfigError(f"{path}: config file not found")

    where = str(path)
    _check_keys(data, _TOP_KEYS, where)
    models: dict[str, ModelConfig] = {DEFAULT_MODEL: bundled_model()}
    for name, table in data.get("models", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [models.{name}] must be a table")
        models[name] = _model_from_table(name, table, path.parent, f"{where} [models.{name}]")
    for model in extra_models:
        models[model.name] = model
    _check_aliases(models, where)

    kwargs: dict[str, Any] = {}
    for key in (
        "max_frame",
        "max_response",
        "max_unsent",
        "max_connections",
        "max_inflight",
        "max_inputs",
    ):
        if key in data:
            _positive(data[key], key, where)
            kwargs[key] = data[key]
    for key in (
        "idle_timeout",
        "frame_timeout",
        "request_timeout",
        "load_timeout",
        "metrics_every",
    ):
        if key in data:
            _positive(data[key], key, where)
            kwargs[key] = float(data[key])
    if "shutdown_grace" in data:
        _positive(data["shutdown_grace"], "shutdown_grace", where, allow_zero=True)
        kwargs["shutdown_grace"] = float(data["shutdown_grace"])
    for key in ("cache_bytes", "bulk_threshold"):
        if key in data:
            _positive(data[key], key, where, allow_zero=True)
            kwargs[key] = data[key]
    for key in ("allow_shutdown", "no_api_key", "http_allow_remote"):
        if key in data:
            kwargs[key] = data[key]
    for key in ("http_socket", "api_key_file", "metrics_file"):
        if key in data:
            value = Path(os.path.expanduser(data[key]))
            kwargs[key] = value if value.is_absolute() else path.parent / value
    if "http" in data:
        kwargs["http"] = data["http"]
    if "cors_origins" in data:
        origins = data["cors_origins"]
        if not all(isinstance(o, str) and o for o in origins):
            raise ConfigError(f"{where}: cors_origins must be a list of origins (strings)")
        kwargs["cors_origins"] = tuple(origins)
    if "log_format" in data:
        if data["log_format"] not in LOG_FORMATS:
            raise ConfigError(f"{where}: log_format must be one of {', '.join(LOG_FORMATS)}")
        kwargs["log_format"] = data["log_format"]
    kwargs.update(_service_keys(data, models, where))

    # --socket, then $EMBEDD_SOCKET, then the file's `socket`, then the runtime-dir default.
    if socket is None and not env.get("EMBEDD_SOCKET") and "socket" in data:
        socket = Path(os.path.expanduser(data["socket"]))
    return Config(
        socket=socket if socket is not None else default_socket_path(env),
        models=models,
        source=source,
        **kwargs,
    )
