"""What the README shows works as shown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import Daemon

README = Path(__file__).parent.parent / "README.md"


def test_readme_client_example_runs_against_the_daemon(daemon: Daemon) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[0]
    assert len(example.strip().splitlines()) <= 5
    code = example + "\nprint(vectors.shape, query.shape)\n"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "EMBEDD_SOCKET": str(daemon.socket)},
    )
    assert out.stdout.strip() == "(2, 384) (384,)"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "./dev test\n" in ci
    assert "./dev test" in README.read_text()


def test_readme_config_sample_is_a_valid_config(tmp_path: Path) -> None:
    from embedd.config import load_config

    blocks = re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)
    sample = tmp_path / "config.toml"
    sample.write_text(next(b for b in blocks if "max_frame" in b))
    config = load_config(sample, env={})
    assert set(config.models) == {"default", "e5"}
    assert config.models["e5"].prompts == {"query": "query: ", "document": "passage: "}
    assert config.models["default"].max_tokens == 256


def test_every_toml_block_in_the_readme_loads(tmp_path: Path) -> None:
    from embedd.config import load_config

    for i, block in enumerate(re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)):
        sample = tmp_path / f"config-{i}.toml"
        # Example user and group names (alice, embedd) need not exist on this machine.
        sample.write_text(re.sub(r"^allow_(uids|gid) = .*$", "", block, flags=re.M))
        load_config(sample, env={})
