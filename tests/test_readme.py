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


def test_ci_runs_exactly_the_test_command_contributing_gives() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "./dev test\n" in ci
    assert "./dev test" in (Path(__file__).parent.parent / "CONTRIBUTING.md").read_text()
