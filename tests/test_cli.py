"""The `embedd` command line, run as a real subprocess against the real daemon."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import embedd_client as ec
import numpy as np
import numpy.typing as npt
import pytest

from tests.conftest import Daemon, cosines, short_tmpdir, start_daemon

REPO = Path(__file__).resolve().parent.parent
DIM = 384
Vec = npt.NDArray[np.float32]

Run = Callable[..., subprocess.CompletedProcess[str]]


def _env(tmp_path: Path) -> dict[str, str]:
    """No user config file, no socket from the environment, and both modules importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("EMBEDD_SOCKET", "EMBEDD_CONFIG")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "client"), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


@pytest.fixture
def cli(tmp_path: Path) -> Run:
    """Runs `python -m embedd ARGS...` as a subprocess."""
    env = _env(tmp_path)

    def run(
        *args: str, stdin: str | None = None, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "embedd", *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            env={**env, **(extra_env or {})},
            cwd=tmp_path,
            timeout=120,
        )

    return run


def _embed_json(result: subprocess.CompletedProcess[str]) -> tuple[str, int, Vec]:
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"model", "dim", "embeddings"}
    return out["model"], out["dim"], np.asarray(out["embeddings"], dtype=np.float32)


# --- embed ------------------------------------------------------------------------------------


def test_cli_embed_prints_json_with_model_dim_and_embeddings(cli: Run, daemon: Daemon) -> None:
    model, dim, vecs = _embed_json(cli("--socket", str(daemon.socket), "embed", "hello", "world"))
    assert (model, dim, vecs.shape) == ("default", DIM, (2, DIM))
    with ec.Client(daemon.socket) as client:
        expected = client.embed(["hello", "world"])
    assert cosines(vecs, expected).min() >= 0.9999


def test_cli_embed_reads_stdin_lines(cli: Run, daemon: Daemon) -> None:
    stdin = "first line\n\n   \nsecond line\r\n"
    result = cli("embed", "--socket", str(daemon.socket), stdin=stdin)
    _, _, vecs = _embed_json(result)
    assert vecs.shape == (2, DIM)  # blank lines skipped, \r\n handled
    with ec.Client(daemon.socket) as client:
        expected = client.embed(["first line", "second line"])
    assert cosines(vecs, expected).min() >= 0.9999


def test_cli_embed_writes_npy(cli: Run, daemon: Daemon, tmp_path: Path) -> None:
    target = tmp_path / "vectors"  # no .npy suffix: the file gets exactly this name
    result = cli("embed", "--socket", str(daemon.socket), "--npy", str(target), "a", "b", "c")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "3 x 384" in result.stderr and str(target) in result.stderr
    arr = np.load(target)
    assert (arr.shape, arr.dtype) == ((3, DIM), np.float32)


def test_cli_embed_options_reach_the_daemon(cli: Run, daemon: Daemon) -> None:
    sock = str(daemon.socket)
    _, dim, vecs = _embed_json(cli("embed", "--socket", sock, "--dimensions", "16", "x"))
    assert (dim, vecs.shape) == (16, (1, 16))
    _, _, raw = _embed_json(cli("embed", "--socket", sock, "--no-normalize", "hello there"))
    assert float(np.linalg.norm(raw[0])) > 1.5
    _, _, cut = _embed_json(cli("embed", "--socket", sock, "--truncate", "word " * 400))
    assert cut.shape == (1, DIM)
    model, _, prompted = _embed_json(
        cli("embed", "--socket", sock, "--model", "prompted", "--prompt", "query", "open a file")
    )
    _, _, spelled = _embed_json(
        cli("embed", "--socket", sock, "--model", "prompted", "query: open a file")
    )
    assert model == "prompted"
    assert cosines(prompted, spelled)[0] > 0.99999


def test_cli_daemon_error_prints_code_and_message_and_exits_1(cli: Run, daemon: Daemon) -> None:
    result = cli("embed", "--socket", str(daemon.socket), "--model", "no-such-model", "x")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("embedd: unknown_model: ")


def test_cli_embed_too_long_input_exits_1_with_input_too_long(cli: Run, daemon: Daemon) -> None:
    result = cli("embed", "--socket", str(daemon.socket), "word " * 400)
    assert result.returncode == 1
    assert result.stderr.startswith("embedd: input_too_long: ")


def test_cli_embed_without_any_input_exits_2(cli: Run, daemon: Daemon) -> None:
    result = cli("embed", "--socket", str(daemon.socket), stdin="\n\n")
    assert result.returncode == 2
    assert "nothing to embed" in result.stderr


def test_cli_embed_when_no_daemon_exits_1(cli: Run) -> None:
    path = short_tmpdir() / "nothing.sock"
    result = cli("embed", "--socket", str(path), "x")
    assert result.returncode == 1
    assert str(path) in result.stderr and "embedd serve" in result.stderr


# --- models, status, load, unload -------------------------------------------------------------


def test_cli_models_prints_a_table_of_every_model(cli: Run, daemon: Daemon) -> None:
    cli("load", "--socket", str(daemon.socket), "default")
    result = cli("models", "--socket", str(daemon.socket))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "STATE", "DIM", "MAX_TOKENS", "POOLING", "THREADS", "MEMORY_MB", "PATH"
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.split()}
    assert {"default", "prompted", "missing", "notgguf"} <= set(rows)
    assert rows["default"][1:5] == ["ready", "384", "256", "mean"]


def test_cli_models_json_is_the_daemons_list(cli: Run, daemon: Daemon) -> None:
    result = cli("models", "--json", "--socket", str(daemon.socket))
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)
    assert {m["name"] for m in models} == {"default", "prompted", "missing", "notgguf"}


def test_cli_status_summarizes_the_daemon(cli: Run, daemon: Daemon) -> None:
    result = cli("status", "--socket", str(daemon.socket))
    assert result.returncode == 0, result.stderr
    assert f"pid {daemon.proc.pid}" in result.stdout
    assert "status:      ok" in result.stdout
    assert "default" in result.stdout


def test_cli_status_shows_each_replicas_busy_share_and_the_core_budget(
    cli: Run, workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir, "[models.default]\npath = '{bundled}'\nreplicas = 2\n")
    own_daemon.append(d)
    d.call("embed", input="a query")
    out = cli("status", "--socket", str(d.socket)).stdout
    timings = out[out.index("REPLICAS BUSY") :].splitlines()
    row = next(line for line in timings if line.startswith("  default "))
    assert row.split()[1:3] == ["0%", "0%"]  # two contexts, idle over the minute
    assert "cores:" in out


def test_cli_status_json_has_hello_health_and_stats(cli: Run, daemon: Daemon) -> None:
    result = cli("status", "--json", "--socket", str(daemon.socket))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["hello"]["pid"] == daemon.proc.pid
    assert report["health"]["status"] == "ok"
    assert "requests" in report["stats"]


def test_cli_status_when_no_daemon_exits_1(cli: Run) -> None:
    path = short_tmpdir() / "nothing.sock"
    result = cli("status", "--socket", str(path))
    assert result.returncode == 1
    assert result.stdout == ""
    assert "not running" in result.stderr and str(path) in result.stderr


def test_cli_load_and_unload_report_the_model_state(cli: Run, daemon: Daemon) -> None:
    loaded = cli("load", "--socket", str(daemon.socket), "prompted")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.startswith("prompted: ready, dim 384")
    unloaded = cli("unload", "--socket", str(daemon.socket), "prompted")
    assert unloaded.returncode == 0, unloaded.stderr
    assert unloaded.stdout.startswith("prompted: unloaded")


def test_cli_load_of_a_broken_model_exits_1(cli: Run, daemon: Daemon) -> None:
    result = cli("load", "--socket", str(daemon.socket), "notgguf")
    assert result.returncode == 1
    assert result.stderr.startswith("embedd: model_load_failed: ")


# --- the socket -------------------------------------------------------------------------------


def test_cli_socket_option_works_before_and_after_the_command(cli: Run, daemon: Daemon) -> None:
    assert cli("--socket", str(daemon.socket), "status").returncode == 0
    assert cli("status", "--socket", str(daemon.socket)).returncode == 0
    nowhere = str(short_tmpdir() / "nothing.sock")
    # The command's own option wins over the global one.
    assert cli("--socket", nowhere, "status", "--socket", str(daemon.socket)).returncode == 0


def test_cli_finds_the_socket_from_embedd_socket(cli: Run, daemon: Daemon) -> None:
    result = cli("status", extra_env={"EMBEDD_SOCKET": str(daemon.socket)})
    assert result.returncode == 0, result.stderr


def test_cli_finds_the_socket_named_in_the_config_file(
    cli: Run, daemon: Daemon, tmp_path: Path
) -> None:
    config = tmp_path / "config" / "embedd" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'socket = "{daemon.socket}"\n')
    result = cli("status")
    assert result.returncode == 0, result.stderr


# --- stop -------------------------------------------------------------------------------------


def test_cli_stop_sends_shutdown_when_the_daemon_allows_it(
    cli: Run, workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir, "allow_shutdown = true\n")
    own_daemon.append(d)
    result = cli("stop", "--socket", str(d.socket))
    assert result.returncode == 0, result.stderr
    assert f"pid {d.proc.pid}" in result.stdout and "stopped" in result.stdout
    assert d.proc.wait(30) == 0
    assert "shutdown requested over the socket" in d.log()


def test_cli_stop_falls_back_to_sigterm_when_shutdown_is_forbidden(
    cli: Run, workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)
    result = cli("stop", "--socket", str(d.socket))
    assert result.returncode == 0, result.stderr
    assert "stopped" in result.stdout
    assert d.proc.wait(30) == 0
    assert "shutdown requested over the socket" not in d.log()


def test_cli_stop_when_no_daemon_exits_1(cli: Run) -> None:
    result = cli("stop", "--socket", str(short_tmpdir() / "nothing.sock"))
    assert result.returncode == 1
    assert "not running" in result.stderr


# --- serve and usage --------------------------------------------------------------------------


def test_cli_serve_with_a_malformed_model_option_exits_2(cli: Run) -> None:
    result = cli("serve", "--socket", str(short_tmpdir() / "s.sock"), "--model", "no-equals-sign")
    assert result.returncode == 2
    assert "NAME=PATH" in result.stderr


def test_cli_serve_with_a_missing_config_file_exits_2(cli: Run, tmp_path: Path) -> None:
    result = cli("serve", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "config file not found" in result.stderr


@pytest.mark.parametrize(
    "command", ["serve", "embed", "models", "status", "load", "unload", "stop"]
)
def test_cli_every_command_has_help_with_examples(cli: Run, command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--socket" in result.stdout


def test_cli_without_a_command_prints_usage_and_exits_2(cli: Run) -> None:
    result = cli()
    assert result.returncode == 2
    assert "usage: embedd" in result.stderr


def test_cli_does_not_import_llama_cpp_for_client_commands(tmp_path: Path) -> None:
    code = "import sys, embedd.cli.main; sys.exit('llama_cpp' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path))
    assert run.returncode == 0


def test_every_command_is_listed_in_the_help_order_once() -> None:
    from embedd.cli import main as cli

    assert sorted(cli.COMMAND_ORDER) == sorted(cli._COMMANDS)
    assert len(set(cli.COMMAND_ORDER)) == len(cli.COMMAND_ORDER)


def test_bench_help_names_every_workload() -> None:
    from embedd.cli import main as cli

    description = cli._COMMANDS["bench"].description
    assert all(f"W{n}:" in description for n in range(1, 6))


def test_version_prints_the_package_version() -> None:
    from embedd import __version__

    out = subprocess.run(
        [sys.executable, "-m", "embedd", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.strip() == f"embedd {__version__}"


def test_the_distribution_name_is_not_the_registrys_unrelated_embedd() -> None:
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["name"] == "embedd-daemon"
    # Every install line the README shows installs this checkout, never the registry's name.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = [line for line in readme.splitlines() if "bin/pip install" in line]
    assert lines and all(re.search(r"pip install (\.|'\.\[)", line) for line in lines)


def test_status_and_models_fit_an_80_column_terminal(cli: Run, daemon: Daemon) -> None:
    for command in ("status", "models"):
        result = cli(command, "--socket", str(daemon.socket))
        assert result.returncode == 0, result.stderr
        assert max(len(line) for line in result.stdout.splitlines()) <= 80, result.stdout


def test_models_shows_each_loaded_models_card(cli: Run, daemon: Daemon) -> None:
    cli("load", "--socket", str(daemon.socket), "default")
    out = cli("models", "--socket", str(daemon.socket)).stdout
    # The card is one line folded at the terminal's width: its continuations are indented.
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  default: ")))
    rest = itertools.takewhile(lambda line: line.startswith("      "), lines[start + 1 :])
    card = " ".join([lines[start], *rest])
    assert "bert" in card and "F16" in card and "sha256 " in card


def test_status_says_capacity_is_not_measured_before_any_full_batch(
    cli: Run, workdir: Path, own_daemon: list[Daemon]
) -> None:
    d = start_daemon(workdir)
    own_daemon.append(d)
    out = cli("status", "--socket", str(d.socket)).stdout
    assert "CAPACITY tok/s" in out and "not measured yet" in out


def test_a_range_error_writes_the_bound_as_in_the_file(tmp_path: Path) -> None:
    from embedd.config import ConfigError, load_config

    (tmp_path / "c.toml").write_text("max_frame = 3\n")
    with pytest.raises(ConfigError, match="between 1024 and 1073741824, got 3"):
        load_config(tmp_path / "c.toml", env={})


def _complete(cli: Run, *words: str) -> list[str]:
    script = cli("completion", "bash").stdout
    line = " ".join(f"'{w}'" for w in words)
    call = f'COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _embedd; echo "${{COMPREPLY[@]}}"'
    probe = f"{script}\n{call}"
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_bash_completion_completes_commands(cli: Run) -> None:
    assert _complete(cli, "embedd", "se") == ["search", "serve", "service"]


def test_bash_completion_completes_a_commands_options_after_a_global_socket(cli: Run) -> None:
    assert _complete(cli, "embedd", "--socket", "/tmp/x.sock", "embed", "--tr") == ["--truncate"]
