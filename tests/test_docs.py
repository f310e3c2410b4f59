"""The documentation says what the code does: checked against the parser, the config's
dataclasses, the HTTP route table and a real daemon, so that a change to one without the other
fails here."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import embedd_client
import pytest

from embedd.cli.main import build_parser
from embedd.config import _MODEL_KEYS, _RANGES, _TOP_KEYS, Config, ModelConfig, load_config
from embedd.http.conversation import ROUTES
from tests.conftest import short_tmpdir

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = [README, REPO / "CONTRIBUTING.md", REPO / "PROTOCOL.md", *sorted(DOCS.glob("*.md"))]
# Options every command has, documented once at the top of docs/cli.md.
GLOBAL_OPTIONS = {"--socket", "--help", "-h", "--version"}


def _sections(text: str, level: str = "## ") -> dict[str, str]:
    """Each heading of `level` and the text under it, up to the next heading of that level."""
    parts = re.split(rf"^{re.escape(level)}(.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


# --- docs/cli.md against the parser -----------------------------------------------------------


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def _cli_sections() -> dict[str, str]:
    sections = _sections((DOCS / "cli.md").read_text())
    return {title.removeprefix("embedd "): body for title, body in sections.items()}


def test_every_command_has_a_section_in_cli_md() -> None:
    assert set(_cli_sections()) == set(_commands())


def test_every_option_of_every_command_is_in_its_section_of_cli_md() -> None:
    sections = _cli_sections()
    for name, sub in _commands().items():
        for action in sub._actions:
            for option in set(action.option_strings) - GLOBAL_OPTIONS:
                assert re.search(rf"`{re.escape(option)}[ `,]", sections[name]), (name, option)


def test_every_positional_argument_is_in_its_section_of_cli_md() -> None:
    sections = _cli_sections()
    for name, sub in _commands().items():
        for action in sub._actions:
            if action.option_strings:
                continue
            words = [str(c) for c in action.choices] if action.choices else [str(action.metavar)]
            for word in words:
                assert re.search(rf"\b{re.escape(word)}\b", sections[name]), (name, word)


def test_every_option_cli_md_names_exists() -> None:
    commands = _commands()
    text = (DOCS / "cli.md").read_text()
    intro = text.split("\n## ", 1)[0]
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", intro)) <= GLOBAL_OPTIONS
    for name, body in _cli_sections().items():
        known = {o for a in commands[name]._actions for o in a.option_strings} | GLOBAL_OPTIONS
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body))
        named |= set(re.findall(r"`(-[a-zA-Z])[ `,]", body))
        assert named <= known, (name, named - known)


def test_the_top_level_options_are_in_cli_md() -> None:
    intro = (DOCS / "cli.md").read_text().split("\n## ", 1)[0]
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert re.search(rf"(?<![\w-]){option}(?![\w-])", intro), option


# --- docs/config.md against embedd/config.py --------------------------------------------------


def _config_rows(section: str) -> dict[str, tuple[str, str]]:
    """`key` -> (default cell, range cell) of a section's table."""
    body = _sections((DOCS / "config.md").read_text())[section]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


TOP_SECTION = "Top-level keys"
MODEL_SECTION = "`[models.NAME]`"


def _documented_default(cell: str) -> Any:
    if cell in ("unset", "required"):
        return dataclasses.MISSING if cell == "required" else None
    return tomllib.loads(f"value = {cell.strip('`')}")["value"]


def _code_default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    # As TOML writes it: tuples are arrays, mappings tables.
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _same(documented: Any, code: Any) -> bool:
    return type(documented) is type(code) and documented == code


@pytest.mark.parametrize(
    ("section", "cls"), [(TOP_SECTION, Config), (MODEL_SECTION, ModelConfig)], ids=["top", "model"]
)
def test_every_config_key_in_config_md_has_the_codes_default(section: str, cls: type) -> None:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, (default, _range) in _config_rows(section).items():
        assert key in fields, key
        code = _code_default(fields[key])
        if key == "socket":  # no default in the dataclass: the path rule decides
            assert default == "unset"
            continue
        assert _same(_documented_default(default), code), (key, default, code)


@pytest.mark.parametrize(
    ("section", "keys"),
    [(TOP_SECTION, set(_TOP_KEYS) - {"models"}), (MODEL_SECTION, set(_MODEL_KEYS))],
    ids=["top", "model"],
)
def test_every_config_key_the_code_reads_is_in_config_md(section: str, keys: set[str]) -> None:
    assert set(_config_rows(section)) == keys


@pytest.mark.parametrize("section", [TOP_SECTION, MODEL_SECTION], ids=["top", "model"])
def test_every_range_in_config_md_is_the_codes(section: str) -> None:
    for key, (_default, cell) in _config_rows(section).items():
        if key not in _RANGES:
            assert cell == "", key
            continue
        low, high = (float(x) for x in cell.split(" to "))
        assert (low, high) == _RANGES[key], key


def test_the_complete_example_in_config_md_is_a_valid_config(tmp_path: Path) -> None:
    example = _sections((DOCS / "config.md").read_text())["A complete example"]
    sample = tmp_path / "config.toml"
    sample.write_text(_code_blocks(example, "toml")[0])
    config = load_config(sample, env={})
    assert set(config.models) == {"default", "e5"}
    assert config.models["e5"].prompts == {"query": "query: ", "document": "passage: "}


def test_every_toml_block_in_the_docs_loads(tmp_path: Path) -> None:
    blocks = [block for page in PAGES for block in _code_blocks(page.read_text(), "toml")]
    assert blocks
    for i, block in enumerate(blocks):
        sample = tmp_path / f"config-{i}.toml"
        # Example user and group names (alice, embedd) need not exist on this machine.
        sample.write_text(re.sub(r"^allow_(uids|gid) = .*$", "", block, flags=re.M))
        load_config(sample, env={})


# --- docs/http.md against the route table -----------------------------------------------------


def _http_sections() -> dict[tuple[str, str], str]:
    sections = _sections((DOCS / "http.md").read_text(), "### ")
    routes = {}
    for title, body in sections.items():
        if match := re.fullmatch(r"`(GET|POST) (/\S*)`", title):
            routes[(match[1], match[2])] = body
    return routes


def test_every_http_route_has_a_section_in_http_md() -> None:
    assert set(_http_sections()) == set(ROUTES)


def test_every_http_section_shows_a_curl_request_and_its_answer() -> None:
    for route, body in _http_sections().items():
        assert "curl " in body, route
        assert re.search(r"^```(json|text)\n", body, re.M), route


# --- links ------------------------------------------------------------------------------------


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(page: Path) -> Iterator[tuple[str, str]]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:", target):
            path, _, anchor = target.partition("#")
            yield path, anchor


def test_every_relative_link_in_the_docs_reaches_a_file_and_heading() -> None:
    for page in PAGES:
        for path, anchor in _links(page):
            target = (page.parent / path).resolve() if path else page
            assert target.exists(), (page.name, path)
            if anchor:
                headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
                assert anchor in {_anchor(h) for h in headings}, (page.name, path, anchor)


# --- the README -------------------------------------------------------------------------------


def test_the_readme_is_short_and_its_contents_line_lists_every_section() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    contents = next(line for line in text.split("\n\n") if line.startswith("**Contents:**"))
    for heading in _sections(text):
        assert f"(#{_anchor(heading)})" in contents, heading


def _quickstart() -> list[str]:
    return _code_blocks(_sections(README.read_text())["Quickstart"], "sh")


@pytest.fixture
def sandbox() -> Iterator[dict[str, str]]:
    """An environment as a new user's shell would have it, in a folder of its own: `embedd`
    on PATH runs this checkout, the default socket lies in the folder, no config file."""
    root = short_tmpdir()
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "embedd"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m embedd "$@"\n')
    shim.chmod(0o755)
    (root / "run").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDD_")}
    env.update(
        HOME=str(root),
        XDG_RUNTIME_DIR=str(root / "run"),
        XDG_CONFIG_HOME=str(root / "config"),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client")]),
    )
    yield env
    # Stop whatever daemon the Quickstart left running: the one on the default socket.
    subprocess.run([shim, "stop"], env=env, capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def _run(block: str, env: dict[str, str]) -> str:
    """Run a block as a shell would; its output goes to files, not pipes, because a daemon the
    block starts in the background keeps them open after the shell has exited."""
    home = Path(env["HOME"])
    with (home / "out").open("w+") as out, (home / "err").open("w+") as err:
        done = subprocess.run(
            ["bash", "-e", "-c", block], cwd=home, env=env, stdout=out, stderr=err, timeout=180
        )
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert done.returncode == 0, f"{block}\n--- stdout:\n{stdout}\n--- stderr:\n{stderr}"
    return stdout


def test_the_readme_quickstart_runs_against_a_real_daemon(sandbox: dict[str, str]) -> None:
    first, *blocks = _quickstart()
    # `./dev demo` builds a virtual environment, which this test already runs in: start the
    # daemon as the demo does (`embedd serve` on the default socket, in the background).
    assert first.strip() == "./dev demo"
    socket = Path(sandbox["XDG_RUNTIME_DIR"]) / "embedd" / "embedd.sock"
    subprocess.Popen(
        [Path(sandbox["PATH"].split(os.pathsep)[0]) / "embedd", "serve"],
        env=sandbox,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    with embedd_client.Client(socket, timeout=60) as client:
        _wait_until_serving(client)
    shell, http = blocks
    assert '"embeddings"' in _run(shell, sandbox)
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the Quickstart's HTTP block was not run")
    assert '{"object":"list","data":[{"object":"embedding"' in _run(http, sandbox)


def _wait_until_serving(client: embedd_client.Client) -> None:
    """Polls until the daemon answers (a bound on start-up, not a speed check)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            client.hello()
            return
        except embedd_client.DaemonUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
