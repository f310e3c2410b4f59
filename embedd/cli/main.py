"""The `embedd` command: run the daemon, and talk to it from a shell.

Everything but `serve` is a thin layer over `embedd_client`, so that the command line exercises
exactly the code other programs use. The daemon module (and with it llama.cpp) is imported only
by `serve`, which keeps the client commands quick to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import embedd_client

from embedd import __version__
from embedd.config import Config, ConfigError, fit_to_cores, load_config, parse_model_option

PROG = "embedd"
# Seconds `stop` waits for the daemon to go away: it drains the requests it accepted first.
STOP_WAIT = 30.0

CommandHandler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]

# The commands in the order `embedd --help` lists them: daemon first, then its clients, then
# the tools.
COMMAND_ORDER = (
    "serve", "embed", "models", "status", "pull", "index", "search", "load", "unload", "stop",
    "service", "bench", "completion",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Command:
    """One subcommand: its handler, and beside it, the arguments and help it takes."""

    handler: CommandHandler
    arguments: Arguments
    summary: str
    description: str
    examples: str


_COMMANDS: dict[str, _Command] = {}


def _command(
    name: str, arguments: Arguments, *, summary: str, description: str, examples: str
) -> Callable[[CommandHandler], CommandHandler]:
    """Register the decorated handler as subcommand `name` (see build_parser)."""

    def register(handler: CommandHandler) -> CommandHandler:
        _COMMANDS[name] = _Command(handler, arguments, summary, description, examples)
        return handler

    return register


class _UsageError(Exception):
    """Bad input from the user (exit status 2, as for argparse's own errors)."""


def _err(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Socket and client


def _socket_path(args: argparse.Namespace) -> Path:
    """The daemon's socket as `embedd serve` would pick it, so both ends agree by default.

    That is --socket, else the `socket` of the config file (when there is one and it sets
    it), else the default path.
    """
    if args.socket:
        return Path(args.socket)
    try:
        return load_config().socket
    except ConfigError:
        # A broken config file is `serve`'s problem; the client still has the default.
        return embedd_client.default_socket_path()


def _client(args: argparse.Namespace, timeout: float | None = 30.0) -> embedd_client.Client:
    return embedd_client.Client(_socket_path(args), timeout=timeout)


def _not_running(path: Path) -> str:
    return f"the daemon is not running (nothing answers at {path}); start it with `embedd serve`"


# --------------------------------------------------------------------------------------------
# Commands


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (TOML); must exist if given")
    p.add_argument(
        "--model",
        metavar="NAME=PATH",
        action="append",
        default=[],
        help="serve the GGUF file PATH as model NAME (repeatable; overrides the config file)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log every request and llama.cpp's own output (debug level)",
    )
    p.add_argument(
        "--preload",
        metavar="MODEL",
        action="append",
        default=[],
        help="load MODEL at start-up, before telling the service manager we are ready "
        "(repeatable; overrides the config's preload)",
    )
    p.add_argument(
        "--idle-exit",
        type=float,
        metavar="SECONDS",
        help="under socket activation, exit after SECONDS without a connection; the service "
        "manager starts the daemon again on the next one (overrides the config's idle_exit)",
    )
    p.add_argument(
        "--http-socket",
        metavar="PATH",
        help="also serve the OpenAI- and Ollama-compatible HTTP API on this Unix socket",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the HTTP API on TCP (loopback only; needs --api-key-file or --no-api-key)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="bearer key for --http (created with a random key, mode 0600, if missing)",
    )
    p.add_argument(
        "--no-api-key", action="store_true", help="serve --http without an API key (any local user)"
    )
    p.add_argument(
        "--http-allow-remote",
        action="store_true",
        help="let --http bind a non-loopback address (other machines can then connect)",
    )
    p.add_argument(
        "--metrics-file",
        metavar="PATH",
        help="write stats in the Prometheus text format to PATH every 15 s (atomically)",
    )
    p.add_argument(
        "--log-format", choices=("text", "json"), help="one text line or one JSON object per event"
    )


@_command(
    "serve",
    _serve_arguments,
    summary="run the daemon in the foreground",
    description=(
        "Run the daemon in the foreground until SIGTERM or Ctrl-C. Models load on first use.\n"
        "Settings come from the config file (default $XDG_CONFIG_HOME/embedd/config.toml,\n"
        "or $EMBEDD_CONFIG), then from these options."
    ),
    examples=(
        "  embedd serve\n"
        "  embedd serve --verbose --socket /tmp/embedd-test.sock\n"
        "  embedd serve --config ~/embedd.toml --model bge=~/models/bge-small-en-v1.5.gguf"
    ),
)
def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        extra = tuple(parse_model_option(m) for m in args.model)
        config = load_config(
            Path(args.config) if args.config else None,
            socket=Path(args.socket) if args.socket else None,
            extra_models=extra,
        )
        config = _service_options(config, args)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    from embedd.http.server import HttpSetupError, check_options

    try:
        check_options(config)
    except HttpSetupError as exc:
        _err(str(exc))
        return 2
    from embedd.daemon import app
    from embedd.inference.threads import machine_cpus, read_affinity, read_quota

    app.setup_logging(args.verbose, config.log_format)  # for the notes below; run sets it again
    config, notes = fit_to_cores(config, machine_cpus(read_affinity(), read_quota()))
    for note in notes:
        logging.getLogger("embedd.config").warning("%s", note)
    return app.run(config, verbose=args.verbose)


def _service_options(config: Config, args: argparse.Namespace) -> Config:
    """`serve`'s options override the config file."""
    changes: dict[str, Any] = {}
    if args.idle_exit is not None:
        if args.idle_exit < 0:
            raise ConfigError(f"--idle-exit must be >= 0, got {args.idle_exit:g}")
        changes["idle_exit"] = args.idle_exit
    for key in ("http_socket", "api_key_file", "metrics_file"):
        if getattr(args, key, None):
            changes[key] = Path(getattr(args, key)).expanduser().resolve()
    for key in ("http", "log_format"):
        if getattr(args, key, None):
            changes[key] = getattr(args, key)
    for key in ("no_api_key", "http_allow_remote"):
        if getattr(args, key, False):
            changes[key] = True
    if args.preload:
        for name in args.preload:
            if name not in config.models:
                raise ConfigError(f"--preload {name}: no model of that name is configured")
        changes["preload"] = tuple(args.preload)
    return dataclasses.replace(config, **changes)


def _service_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("install", "uninstall"))
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--user",
        action="store_false",
        dest="system",
        default=False,
        help="a per-user service (default)",
    )
    scope.add_argument(
        "--system", action="store_true", help="a system-wide service for a shared machine"
    )
    p.add_argument("--dry-run", action="store_true", help="print the files instead of writing")
    p.add_argument("--config", metavar="FILE", help="the config file the service runs with")
    p.add_argument(
        "--idle-exit", type=float, metavar="SECONDS", help="the daemon exits when idle that long"
    )
    p.add_argument(
        "--no-preload",
        action="store_true",
        help="do not load the default model before reporting ready (load on first use)",
    )
    p.add_argument(
        "--manager",
        choices=("systemd", "launchd"),
        help="which service manager (default: launchd on macOS, else systemd)",
    )
    p.add_argument("--root", metavar="DIR", help="write under DIR instead of / (images, tests)")


@_command(
    "service",
    _service_arguments,
    summary="install the systemd units (or the launchd agent)",
    description=(
        "install: write the service manager's files, filled in with this Python\n"
        "(sys.executable) and the given config, and print the commands that enable them:\n"
        "systemd's embedd.socket + embedd.service (socket activation, Type=notify, watchdog),\n"
        "or on macOS a LaunchAgent. uninstall: remove them. --dry-run prints instead.\n"
        "See docs/service.md."
    ),
    examples=(
        "  embedd service install --dry-run\n"
        "  embedd service install --user --idle-exit 600\n"
        "  sudo embedd service install --system\n"
        "  embedd service uninstall"
    ),
)
def _cmd_service(args: argparse.Namespace) -> int:
    from embedd.cli import service

    manager = args.manager or service.default_manager()
    root = Path(args.root) if args.root else None
    try:
        if args.action == "install":
            plan = service.plan_install(
                manager=manager,
                system=args.system,
                python=sys.executable,
                config=Path(args.config).expanduser().resolve() if args.config else None,
                preload=not args.no_preload,
                idle_exit=args.idle_exit,
                root=root,
            )
        else:
            plan = service.plan_uninstall(manager=manager, system=args.system, root=root)
        lines: list[str] = []
        try:
            service.execute(plan, dry_run=args.dry_run, out=lines)
        finally:
            print("\n".join(lines))
    except service.ServiceError as exc:
        raise _UsageError(str(exc)) from None
    except OSError as exc:
        _err(f"cannot {args.action}: {exc}")
        return 1
    return 0


def _read_stdin_texts() -> list[str]:
    if sys.stdin.isatty():
        print("(reading texts from stdin, one per line; end with Ctrl-D)", file=sys.stderr)
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _UsageError(f"stdin is not valid UTF-8: {exc}") from None
    # Split on newlines only: str.splitlines() would also cut at form feeds and U+2028.
    lines = (line.removesuffix("\r") for line in text.split("\n"))
    return [line for line in lines if line.strip()]


def _embed_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed (default: stdin lines)")
    p.add_argument("--model", default="default", help="model name (default: %(default)s)")
    p.add_argument("--prompt", metavar="NAME", help="a prompt prefix configured for the model")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="cut inputs longer than the model's max_tokens instead of failing",
    )
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalize the vectors")
    p.add_argument("--dimensions", type=int, metavar="N", help="keep only the first N components")
    p.add_argument("--npy", metavar="FILE", help="write the vectors to FILE as .npy")


@_command(
    "embed",
    _embed_arguments,
    summary="embed texts, print JSON or write .npy",
    description=(
        "Embed the TEXT arguments, or else each non-blank line of stdin, and print\n"
        '{"model": ..., "dim": ..., "embeddings": [[...], ...]} on stdout (one vector per\n'
        "text, in order), or with --npy save an (n, dim) float32 array instead."
    ),
    examples=(
        "  embedd embed 'The cat sat on the mat.' 'A dog barked.'\n"
        "  embedd embed < sentences.txt > vectors.json\n"
        "  embedd embed --npy vectors.npy --dimensions 128 < sentences.txt\n"
        "  embedd embed --model bge --prompt query 'how do I reset my password'"
    ),
)
def _cmd_embed(args: argparse.Namespace) -> int:
    texts: list[str] = args.texts or _read_stdin_texts()
    if not texts:
        raise _UsageError("nothing to embed: give TEXT arguments or lines on stdin")
    # No client-side limit: a big batch may take a while, and the daemon enforces its own
    # request_timeout.
    options: embedd_client.EmbedOptions = {
        "normalize": not args.no_normalize,
        "truncate": args.truncate,
    }
    if args.dimensions is not None:
        options["dimensions"] = args.dimensions
    if args.prompt is not None:
        options["prompt"] = args.prompt
    with _client(args, timeout=None) as client:
        vectors = client.embed(texts, args.model, **options)
    count, dim = vectors.shape
    if args.npy:
        import numpy as np

        # Through a file object: np.save(name) would append ".npy" to a name without it.
        with open(args.npy, "wb") as f:
            np.save(f, vectors)
        _err(f"wrote {count} x {dim} float32 vectors ({args.model}) to {args.npy}")
        return 0
    json.dump({"model": args.model, "dim": dim, "embeddings": vectors.tolist()}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _mb(nbytes: Any) -> str:
    return f"{nbytes / 2**20:.1f}" if isinstance(nbytes, int | float) else "-"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _width() -> int:
    """The terminal's width (80 when not a terminal and $COLUMNS is unset)."""
    return shutil.get_terminal_size((80, 24)).columns


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, keeping its end (a path's file name matters most)."""
    return text if len(text) <= width else "…" + text[len(text) - width + 1 :]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is cut (from its start) so that
    every line fits the terminal instead of wrapping."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    room = max(8, _width() - sum(w + 2 for w in widths[:-1]))
    lines = (
        "  ".join(
            [*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)), _fit(row[-1], room)]
        )
        for row in [header, *rows]
    )
    return "\n".join(line.rstrip() for line in lines)


def _card_line(m: Mapping[str, Any]) -> str | None:
    """One line of what the model file says about itself (`models --json` has all of it)."""
    if not m.get("architecture"):
        return None
    size = m.get("size")
    sha = m.get("sha256")
    parts = [
        str(m.get("architecture")),
        str(m.get("model_name") or "unnamed"),
        str(m.get("quantization") or "?"),
        # A reranker says so, with the pair it reads (an embedding model is the usual case).
        f"reranker {m.get('pair_template')}" if m.get("task") == "rerank" else None,
        f"{size / 1e6:.1f} MB" if isinstance(size, int) else None,
        f"license {m['license']}" if m.get("license") else None,
        "causal" if m.get("causal") else None,
        f"on {m.get('runs_on', 'cpu')}",
        f"sha256 {sha[:12]}" if isinstance(sha, str) else None,
    ]
    return _wrap(f"  {m.get('name')}: " + ", ".join(p for p in parts if p))


def _wrap(text: str) -> str:
    """A long line folded at the terminal's width, continued with an indent."""
    return textwrap.fill(text, _width(), subsequent_indent="      ", break_on_hyphens=False)


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the daemon's raw list as JSON")
    p.add_argument(
        "--remove",
        metavar="NAME",
        help="take [models.NAME] out of the config file, and delete its file if `embedd pull` "
        "downloaded it (a running daemon keeps serving it until it restarts)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the config file for --remove (default: $XDG_CONFIG_HOME/embedd/config.toml)",
    )


@_command(
    "models",
    _models_arguments,
    summary="list the configured models",
    description="List the models the daemon is configured with and their state.",
    examples=("  embedd models\n  embedd models --json | jq '.[].name'"),
)
def _cmd_models(args: argparse.Namespace) -> int:
    if args.remove:
        return _remove_model(args)
    with _client(args) as client:
        models = client.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    header = ("NAME", "STATE", "DIM", "MAX_TOKENS", "POOLING", "THREADS", "MEMORY_MB", "PATH")
    rows = [
        (
            _cell(m.get("name")),
            _cell(m.get("state")),
            _cell(m.get("dim")),
            _cell(m.get("max_tokens")),
            _cell(m.get("pooling")),
            _cell(m.get("threads")),
            _mb(m.get("memory")),
            _cell(m.get("path")),
        )
        for m in models
    ]
    print(_table(header, rows))
    cards = [line for m in models if (line := _card_line(m))]
    if cards:
        print("\nmodel files:")
        print("\n".join(cards))
    for m in models:
        if m.get("error"):
            print(_wrap(f"{m.get('name')}: failed: {m['error']}"))
        if m.get("aliases"):
            print(_wrap(f"  aliases of {m.get('name')}: {', '.join(m['aliases'])}"))
    return 0


def _remove_model(args: argparse.Namespace) -> int:
    from embedd.cli import pull
    from embedd.config import default_config_path

    config = Path(args.config) if args.config else default_config_path()
    try:
        deleted = pull.remove(config, args.remove)
    except pull.PullError as exc:
        _err(str(exc))
        return 1
    _err(
        f"removed [models.{args.remove}] from {config}"
        + (f" and deleted {deleted}" if deleted else " (its file is not one pull downloaded: kept)")
    )
    return 0


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if hours or days else []
    return " ".join([*parts, f"{minutes}m", f"{s:02d}s"])


def _status_text(
    path: Path, hello: Mapping[str, Any], health: Mapping[str, Any], stats: Mapping[str, Any]
) -> str:
    conns = stats.get("connections", {})
    reqs = stats.get("requests", {})
    errors: Mapping[str, int] = reqs.get("errors", {})
    n_errors = sum(errors.values())
    detail = ", ".join(f"{code} {n}" for code, n in sorted(errors.items()))
    cores = stats.get("cores", {})
    # llama.cpp and the weights live in the model processes, not in the daemon's own memory.
    models_rss = sum(
        int((m.get("process") or {}).get("rss_bytes") or 0)
        for m in stats.get("models", {}).values()
    )
    lines = [
        f"{hello.get('server', 'embedd')} (protocol {hello.get('protocol')}), "
        f"pid {hello.get('pid')}",
        f"socket:      {path}",
        f"status:      {health.get('status')}, up {_duration(health.get('uptime'))}",
        f"connections: {conns.get('open', 0)} open, {conns.get('total', 0)} total, "
        f"{conns.get('refused', 0)} refused, {conns.get('timed_out', 0)} timed out",
        f"memory:      {_mb(stats.get('rss_bytes'))} MB resident"
        + (f", model processes {_mb(models_rss)} MB" if models_rss else ""),
        f"cores:       {cores.get('in_use', 0)} of {cores.get('usable', '?')} in use now, "
        f"at most {cores.get('peak_in_use', 0)} at once",
        textwrap.fill(
            f"requests:    {reqs.get('total', 0)} total, {reqs.get('ok', 0)} ok, {n_errors} "
            "errors" + (f" ({detail})" if detail else ""),
            _width(),
            subsequent_indent=" " * 13,
        ),
        f"models:      {health.get('models_ready', 0)} of {len(hello.get('models', []))} ready",
    ]
    model_stats: Mapping[str, Mapping[str, Any]] = stats.get("models", {})
    counts, timings = [], []
    for name, m in model_stats.items():
        capacity = m.get("tokens_per_second")
        latency = m.get("latency_ms") or {}
        busy = m.get("busy_fraction")
        measured = isinstance(capacity, int | float) and m.get("throughput_measured")
        replicas = m.get("replicas") or []
        counts.append(
            (
                "  " + name,
                _cell(m.get("state")),
                _cell(m.get("requests")),
                _cell(m.get("inputs")),
                _cell(m.get("queue_inputs")),
                f"{100 * busy:.0f}%" if isinstance(busy, int | float) else "-",
                # What full batches have reached, not the current rate: it is what
                # retry_after is estimated from, and means nothing before the first one.
                f"{capacity:.0f}" if measured else "not measured yet",
            )
        )
        timings.append(
            (
                "  " + name,
                # Each context's busy share of the last minute: one busy and one idle is a
                # model keeping a core for queries while bulk runs.
                " ".join(_percent(r.get("busy_fraction")) for r in replicas) or "-",
                _quantiles(latency.get("queue_wait")),
                _quantiles(latency.get("compute")),
            )
        )
    if counts:
        lines.append(
            _table(
                ("  MODEL", "STATE", "REQUESTS", "INPUTS", "QUEUED", "BUSY", "CAPACITY tok/s"),
                counts,
            )
        )
        lines.append(
            _table(
                ("  MODEL", "REPLICAS BUSY", "WAIT ms p50/p95/p99", "COMPUTE ms p50/p95/p99"),
                timings,
            )
        )
    for name, m in model_stats.items():
        process = m.get("process") or {}
        if process.get("crashes"):
            lines.append(
                _wrap(
                    f"  {name}: its model process died {process['crashes']} time(s), restarted "
                    f"{process.get('restarts', 0)}, inputs found to kill it "
                    f"{process.get('poison_inputs_found', 0)}, refused "
                    f"{process.get('poison_inputs_refused', 0)}"
                )
            )
        if m.get("error"):
            lines.append(_wrap(f"  {name}: failed: {m['error']}"))
    return "\n".join(lines)


def _percent(fraction: Any) -> str:
    return f"{100 * fraction:.0f}%" if isinstance(fraction, int | float) else "?"


def _quantiles(q: Mapping[str, float] | None) -> str:
    if not q:
        return "-"
    return "/".join(f"{q.get(k, 0):.1f}" for k in ("p50", "p95", "p99"))


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print hello, health and stats as JSON")


@_command(
    "status",
    _status_arguments,
    summary="show whether the daemon runs, and its counters",
    description=(
        "Show the daemon's version, pid, uptime, connections, requests and models.\n"
        "Exits with status 1 if no daemon answers."
    ),
    examples=(
        "  embedd status\n  embedd status --json\n  embedd status >/dev/null 2>&1 || embedd serve &"
    ),
)
def _cmd_status(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    with embedd_client.Client(path) as client:
        try:
            hello = client.hello()
        except embedd_client.DaemonUnavailableError:
            _err(_not_running(path))
            return 1
        health = client.health()
        stats = client.stats()
    if args.json:
        report = {"socket": str(path), "hello": hello, "health": health, "stats": stats}
        print(json.dumps(report, indent=2))
    else:
        print(_status_text(path, hello, health, stats))
    return 0


def _model_line(m: Mapping[str, Any]) -> str:
    line = f"{m.get('name')}: {m.get('state')}"
    if m.get("dim") is not None:
        line += f", dim {m['dim']}, {_mb(m.get('memory'))} MB"
    if m.get("error"):
        line += f" ({m['error']})"
    return line


def _model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="MODEL", help="model name")


@_command(
    "load",
    _model_argument,
    summary="load a model now",
    description="Load a model now (instead of on first use) and wait until it is ready.",
    examples="  embedd load default",
)
def _cmd_load(args: argparse.Namespace) -> int:
    # No client-side limit: a large model may take minutes to load.
    with _client(args, timeout=None) as client:
        print(_model_line(client.load(args.name)))
    return 0


@_command(
    "unload",
    _model_argument,
    summary="free a model's memory",
    description="Let the model's accepted work finish, then free it. It loads again on next use.",
    examples="  embedd unload default",
)
def _cmd_unload(args: argparse.Namespace) -> int:
    with _client(args, timeout=None) as client:
        print(_model_line(client.unload(args.name)))
    return 0


def _answers(path: Path) -> bool:
    try:
        with embedd_client.Client(path, timeout=2.0) as client:
            client.health()
    except embedd_client.DaemonUnavailableError:
        return False
    except embedd_client.EmbeddError:
        return True  # e.g. our own timeout: something is still there
    return True


def _terminate(pid: Any) -> str | None:
    """SIGTERM the daemon, but only a plausible pid of our own user; else why not."""
    if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        return f"the daemon reported an implausible pid {pid!r}"
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return f"no process {pid} here (is the daemon in another container?)"
        owner = None  # no /proc (macOS): rely on kill()'s own permission check
    if owner is not None and owner != os.getuid():
        return f"process {pid} belongs to uid {owner}, not to you"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return f"no process {pid}"
    except PermissionError:
        return f"not allowed to signal process {pid}"
    return None


def _request_stop(client: embedd_client.Client, pid: Any) -> str | None:
    """Ask the daemon to exit, by request or else by signal; says how, or None on failure."""
    try:
        client.shutdown()
    except embedd_client.DaemonUnavailableError:
        pass  # it closed the connection on its way out
    except embedd_client.EmbeddError as exc:
        if exc.code != "forbidden":
            raise
        # The daemon does not take shutdown over the socket (allow_shutdown = false);
        # signalling it is what systemctl would do.
        problem = _terminate(pid)
        if problem is not None:
            _err(f"the daemon's config does not allow shutdown, and SIGTERM failed: {problem}")
            return None
        return f"sent SIGTERM to pid {pid}"
    return "asked it to shut down"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited daemon whose parent has not reaped it yet is a zombie: it is gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="URL", help="an http(s) URL or hf:OWNER/REPO/FILE.gguf")
    p.add_argument("--name", help="the model's name in the config (default: from the file)")
    p.add_argument("--sha256", metavar="HEX", help="the file's expected sha256")
    p.add_argument(
        "--max-size",
        metavar="SIZE",
        help="refuse a download larger than SIZE, with K, M, G or T (default 20G: the largest "
        "embedding GGUFs, 8 B parameters at F16, with room to spare)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="the config file to add the model to (default: $XDG_CONFIG_HOME/embedd/config.toml)",
    )


@_command(
    "pull",
    _pull_arguments,
    summary="download a GGUF embedding model and add it to the config",
    description=(
        "Download URL (or hf:OWNER/REPO/FILE.gguf from Hugging Face) into\n"
        "$XDG_DATA_HOME/embedd/models, resuming an interrupted download, check its sha256\n"
        "(--sha256, or what the server publishes), refuse a file that is not a GGUF embedding\n"
        "model, and add [models.NAME] to the user's config file."
    ),
    examples=(
        "  embedd pull hf:nomic-ai/nomic-embed-text-v1.5-GGUF/nomic-embed-text-v1.5.Q8_0.gguf \\\n"
        "      --name nomic"
    ),
)
def _cmd_pull(args: argparse.Namespace) -> int:
    from embedd.cli import pull
    from embedd.config import default_config_path

    config = Path(args.config) if getattr(args, "config", None) else default_config_path()
    try:
        path = pull.pull(
            args.source,
            name=args.name,
            sha256=args.sha256,
            config=config,
            max_bytes=pull.parse_size(args.max_size) if args.max_size else pull.MAX_MODEL_BYTES,
            tty=sys.stderr.isatty(),
        )
    except pull.PullError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted: run the same command again to resume the download")
        return 130
    _err(f"pulled {path}; added to {config} (embedd serve picks it up when it starts)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _not_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _index_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (recursively)")
    p.add_argument("--out", metavar="INDEX", help="the SQLite file to write")
    p.add_argument("--model", default="default", help="model name (default: %(default)s)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="skip paths matching GLOB (gitignore-style; repeatable)",
    )
    p.add_argument(
        "--chunk-tokens",
        type=_positive,
        metavar="N",
        help="tokens per chunk at most (default: the model's limit)",
    )
    p.add_argument(
        "--overlap",
        type=_not_negative,
        default=0,
        metavar="N",
        help="tokens shared by neighbouring chunks (default: 0; under half of a chunk)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--from-parquet",
        metavar="DIR",
        help="add the chunks of an embedd.ray Parquet output to --out INDEX (no daemon)",
    )
    what.add_argument(
        "--list", metavar="INDEX", help="show INDEX: model, files, chunks, when (no daemon)"
    )
    what.add_argument(
        "--drop", metavar="INDEX", help="delete INDEX, after checking it is an embedd index"
    )


@_command(
    "index",
    _index_arguments,
    summary="index text files (any name: decided by content) and PDFs into a SQLite file",
    description=(
        "Cut every text file (UTF-8 without NUL bytes, whatever its name) into chunks with the\n"
        "model's own tokenizer, embed them at bulk priority and store one row per chunk (file,\n"
        "line, text, tokens, model, vector) and a keyword (BM25) index in INDEX. Re-running\n"
        "updates only changed files and drops deleted ones; an interrupted run resumes where\n"
        "it stopped. Progress is in tokens, with an ETA from the measured speed. PDFs need the\n"
        "optional pdf extra (pypdf). --list and --drop show or delete an index;\n"
        "--from-parquet adds the chunks an embedd.ray job wrote (needs pyarrow)."
    ),
    examples=(
        "  embedd index ~/notes --out notes.db --exclude '*.tmp' --exclude drafts\n"
        "  embedd index ~/notes --out notes.db --chunk-tokens 128 --overlap 16\n"
        "  embedd index --from-parquet vectors/ --out corpus.db   # embedd.ray's output\n"
        "  embedd index --list notes.db\n"
        "  embedd index --drop notes.db"
    ),
)
def _cmd_index(args: argparse.Namespace) -> int:
    from embedd import index
    from embedd.cli import index as shown

    if args.list or args.drop:
        if args.paths or args.out:
            raise _UsageError("--list and --drop take only the INDEX")
        try:
            if args.list:
                print(shown.describe_text(index.describe(args.list)))
            else:
                index.drop(args.drop)
                _err(f"deleted {args.drop}")
        except index.IndexUsageError as exc:
            _err(str(exc))
            return 1
        return 0
    if args.from_parquet:
        if args.paths or not args.out:
            raise _UsageError("--from-parquet DIR takes --out INDEX and no PATH")
        try:
            counts = index.index_parquet(args.from_parquet, args.out)
        except index.IndexUsageError as exc:
            _err(str(exc))
            return 1
        _err(
            f"imported {counts.chunks} chunks of {counts.files_indexed} documents from "
            f"{args.from_parquet} -> {args.out}"
        )
        return 0
    if not args.paths or not args.out:
        raise _UsageError("give the files or folders to index and --out INDEX")
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        raise _UsageError(f"no such file or folder: {', '.join(missing)}")
    path = _socket_path(args)
    try:
        with _client(args, timeout=None) as client:
            counts = index.index_paths(
                args.paths,
                args.out,
                model=args.model,
                excludes=args.exclude,
                chunk_tokens=args.chunk_tokens,
                overlap=args.overlap,
                client=client,
                progress=shown.Progress(sys.stderr, tty=sys.stderr.isatty()),
            )
    except embedd_client.DaemonUnavailableError:
        _err(_not_running(path))
        return 1
    except index.IndexUsageError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        _err("interrupted: finished files are saved; run the same command to go on")
        return 130
    _err(shown.summary(counts, args.out))
    return 0


def _search_arguments(p: argparse.ArgumentParser) -> None:
    from embedd.index import DEFAULT_MODE, MODES

    p.add_argument("index", metavar="INDEX", help="the SQLite file `embedd index` wrote")
    p.add_argument("query", metavar="QUERY", help="what to look for")
    p.add_argument("-k", type=_positive, default=10, help="how many results (default: %(default)s)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="rank by vectors and keywords fused, vectors only, or keywords (BM25) only "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--path",
        action="append",
        default=[],
        metavar="GLOB",
        help="only files whose path (relative to the indexed folder) matches GLOB; a GLOB "
        "without / also matches the file name, a folder name all under it; one starting with "
        "/, ./ or ../ is a path from the current directory (repeatable)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="a JSON list of {path, line, score, passage, matches, similar, file, span, text}",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="say why each hit ranks where it does: its rank, score and vote in each list, "
        "the fused score, the near duplicates and adjacent chunks folded into it, boilerplate",
    )
    p.add_argument(
        "--rerank",
        metavar="MODEL",
        help="reorder the best fused hits with MODEL, a reranker the daemon serves (a "
        "cross-encoder reading query and chunk together); off by default",
    )


@_command(
    "search",
    _search_arguments,
    summary="search an index built by `embedd index`",
    description=(
        "Rank the chunks for QUERY by meaning (cosine to the embedded query, with the model's\n"
        "`query` prompt if it has one) and by keywords (BM25), fused into passages (--mode;\n"
        "near duplicates folded), and print each as PATH:LINE (relative to the indexed\n"
        "folder), its score and the passage that matches best, the query's words marked\n"
        "(--explain: why each hit ranks where it does)."
    ),
    examples=(
        "  embedd search notes.db 'how do I renew the certificate' -k 5\n"
        "  embedd search notes.db 'backup schedule' --path 'work/*' --path '*.md'\n"
        "  embedd search notes.db 'ERR_CERT_DATE_INVALID' --mode bm25\n"
        "  embedd search notes.db 'CVE-2024-45491' --explain\n"
        "  embedd search notes.db 'why does the upload stall' --rerank bge-reranker"
    ),
)
def _cmd_search(args: argparse.Namespace) -> int:
    from embedd import index
    from embedd.cli import index as shown

    path = _socket_path(args)
    try:
        with _client(args) as client:
            hits = index.search(
                args.index,
                args.query,
                k=args.k,
                mode=args.mode,
                paths=args.path,
                client=client,
                note=_err,
                rerank=args.rerank,
                meaning_passages=True,  # a person reads them
            )
    except embedd_client.DaemonUnavailableError:
        _err(_not_running(path))
        return 1
    except index.IndexUsageError as exc:
        _err(str(exc))
        return 1
    width = shutil.get_terminal_size().columns
    if args.json:
        print(shown.hits_json(hits, explain=args.explain))
    else:
        tty = sys.stdout.isatty()
        print(shown.hits_text(hits, width, tty=tty, explain=args.explain))
    return 0


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model to measure (default: default)")
    p.add_argument("--quick", action="store_true", help="a small slice of the corpus")
    p.add_argument(
        "--no-baseline", action="store_true", help="measure only the daemon (no llama.cpp here)"
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument(
        "--second-model",
        metavar="MODEL",
        help="also drive MODEL together with --model: throughput of two models against one",
    )
    p.add_argument(
        "--svg",
        metavar="FILE",
        help="also draw the query latencies (idle, during bulk, with a busy core; daemon and "
        "baseline) as an SVG picture in FILE",
    )


@_command(
    "bench",
    _bench_arguments,
    summary="measure the running daemon against in-process llama-cpp-python",
    description=(
        "Run five workloads against the running daemon, then the same workloads against\n"
        "llama-cpp-python in this process (same model file, threads and texts: the raw\n"
        "baseline), and print a table with the ratios. W1: all bundled corpus chunks in\n"
        "requests of 32 (chunks/s). W2: all queries, one per request, 8 clients (requests/s,\n"
        "p50, p99). W3: W1 again while one client sends a query every 10 ms (the queries'\n"
        "p50, p99). W4: queries while another client re-sends texts the cache answers (p50,\n"
        "p99). W5: one query at a time, and W1, while a process keeps one core busy. idle:\n"
        "one query at a time (p50). Plus the daemon's resident memory.\n"
        "Takes about two minutes on 2 cores; --quick (a small slice) about fifteen seconds."
    ),
    examples=(
        "  embedd bench\n  embedd bench --json > bench.json\n  embedd bench --quick --no-baseline\n"
        "  embedd bench --svg bench.svg"
    ),
)
def _cmd_bench(args: argparse.Namespace) -> int:
    from embedd.cli import bench  # imports llama.cpp for the baseline only when run

    path = _socket_path(args)
    try:
        return bench.run(
            path,
            args.model,
            quick=args.quick,
            baseline=not args.no_baseline,
            as_json=args.json,
            second=args.second_model,
            svg_path=Path(args.svg) if args.svg else None,
        )
    except embedd_client.DaemonUnavailableError:
        _err(_not_running(path))
        return 1


def _stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=float,
        default=STOP_WAIT,
        metavar="SECONDS",
        help="how long to wait for the daemon to exit (default: %(default)g)",
    )


@_command(
    "stop",
    _stop_arguments,
    summary="stop the daemon",
    description=(
        "Stop the daemon: send it `shutdown`, or, if its config does not allow that,\n"
        "SIGTERM (only to a process of your own user). Then wait until it is gone.\n"
        "The daemon finishes the requests it already accepted before exiting."
    ),
    examples=("  embedd stop\n  embedd stop --wait 120"),
)
def _cmd_stop(args: argparse.Namespace) -> int:
    path = _socket_path(args)
    with embedd_client.Client(path, timeout=10.0) as client:
        try:
            pid = client.hello().get("pid")
        except embedd_client.DaemonUnavailableError:
            _err(_not_running(path))
            return 1
        except embedd_client.EmbeddError as exc:
            if exc.code != "shutting_down":
                raise
            pid, how = "?", "it was already shutting down"
        else:
            requested = _request_stop(client, pid)
            if requested is None:
                return 1
            how = requested
    deadline = time.monotonic() + args.wait
    # The listening socket closes as soon as draining starts; the process is gone only once
    # every accepted request has been answered, so wait for the process when we know it.
    while _alive(pid) if isinstance(pid, int) else _answers(path):
        if time.monotonic() >= deadline:
            _err(
                f"{how}, but the daemon (pid {pid}) still answers after {args.wait:g} s; "
                "it may be finishing long requests"
            )
            return 1
        time.sleep(0.2)
    print(f"{PROG}: daemon (pid {pid}) stopped")
    return 0


# --------------------------------------------------------------------------------------------
# Parser


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A local text-embedding daemon, and commands to talk to it.",
        epilog=(
            "The socket is, first that applies: --socket, $EMBEDD_SOCKET, the config file's\n"
            "`socket`, $XDG_RUNTIME_DIR/embedd/embedd.sock, /tmp/embedd-$UID/embedd.sock.\n"
            "\n"
            "exit status: 0 success, 1 the daemon refused or is unreachable, 2 bad usage\n"
            "\n"
            "examples:\n"
            "  embedd serve &\n"
            "  embedd embed 'hello world'\n"
            "  embedd status\n"
            "  embedd <command> --help"
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("--socket", metavar="PATH", default=None, help="the daemon's Unix socket")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket", metavar="PATH", default=argparse.SUPPRESS, help="the daemon's Unix socket"
    )
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name in COMMAND_ORDER:
        cmd = _COMMANDS[name]
        p = sub.add_parser(
            name,
            parents=[common],
            help=cmd.summary,
            description=cmd.description,
            epilog="examples:\n" + cmd.examples,
            formatter_class=_Formatter,
        )
        p.set_defaults(handler=cmd.handler)
        cmd.arguments(p)
    return parser


def _completion_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=("bash",), help="the shell (zsh: bashcompinit, then this)")


@_command(
    "completion",
    _completion_arguments,
    summary="print a shell completion script",
    description=(
        "Print a completion script for the shell: commands and each command's options\n"
        "complete on Tab, anything else completes as a file name."
    ),
    examples=(
        "  embedd completion bash > ~/.local/share/bash-completion/completions/embedd\n"
        "  source <(embedd completion bash)"
    ),
)
def _cmd_completion(args: argparse.Namespace) -> int:
    print(completion_script(build_parser()))
    return 0


def completion_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function generated from the parser itself, so it cannot fall behind
    the commands and options it completes."""
    commands: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = sorted(o for a in sub._actions for o in a.option_strings)
    top = sorted(commands) + sorted(o for a in parser._actions for o in a.option_strings)
    cases = "".join(
        f'    {name}) words="{" ".join(options)}" ;;\n' for name, options in commands.items()
    )
    return (
        "# bash completion for embedd (generated by `embedd completion bash`)\n"
        "_embedd() {\n"
        '  local cur=${COMP_WORDS[COMP_CWORD]} cmd="" words w skip=""\n'
        '  for w in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do\n'
        '    if [ -n "$skip" ]; then skip=""; continue; fi\n'
        "    case $w in --socket) skip=1 ;; -*) ;; *) cmd=$w; break ;; esac\n"
        "  done\n"
        "  case $cmd in\n"
        f'    "") words="{" ".join(top)}" ;;\n'
        f"{cases}"
        '    *) words="" ;;\n'
        "  esac\n"
        '  COMPREPLY=($(compgen -W "$words" -- "$cur"))\n'
        "}\n"
        "complete -o default -F _embedd embedd"
    )


def _quiet_broken_stdout() -> None:
    # Output piped into `head` and the like: stop quietly, and keep Python from complaining
    # again when it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 2


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return _exit_code(exc)
    handler: CommandHandler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except _UsageError as exc:
        _err(str(exc))
        return 2
    except embedd_client.DaemonUnavailableError as exc:
        _err(exc.message)
        return 1
    except embedd_client.EmbeddError as exc:
        _err(f"{exc.code}: {exc.message}")
        return 1
    except BrokenPipeError:
        _quiet_broken_stdout()
        return 1
    except KeyboardInterrupt:
        return 130
