"""`embedd pull` against an HTTP server this test starts on 127.0.0.1 (no hub is reachable):
resume after an interrupted download, a corrupt file refused, the config entry added."""

from __future__ import annotations

import hashlib
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from embedd.cli import pull
from tests.conftest import BUNDLED


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support; `cut_once` makes the first response stop early."""

    files: ClassVar[dict[str, bytes]] = {}
    cut_once: ClassVar[set[str]] = set()
    ranges: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.ranges.append(self.headers.get("Range"))
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
            self.send_header("X-Linked-ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.path in self.cut_once:
            self.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"XDG_DATA_HOME": str(tmp_path / "data")}


def test_an_interrupted_download_resumes_and_the_model_is_added_to_the_config(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/mini.gguf"] = BUNDLED.read_bytes()
    _Files.cut_once.add("/m/mini.gguf")
    _Files.ranges.clear()
    config = tmp_path / "config.toml"
    config.write_text("# my settings\ncache_bytes = 0\n")
    with pytest.raises(pull.PullError, match="resume"):
        pull.pull(f"{server}/m/mini.gguf", name="mini", sha256=None, config=config, env=env)
    path = pull.pull(f"{server}/m/mini.gguf", name="mini", sha256=None, config=config, env=env)
    assert _Files.ranges[-1] is not None and _Files.ranges[-1].startswith("bytes=")
    assert path.read_bytes() == BUNDLED.read_bytes()
    text = config.read_text()
    assert text.startswith("# my settings\ncache_bytes = 0\n")
    assert f'[models.mini]\npath = "{path}"' in text


def test_a_corrupt_download_is_refused_and_deleted(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    good = BUNDLED.read_bytes()
    _Files.files["/m/bad.gguf"] = good[:-10] + b"x" * 10
    with pytest.raises(pull.PullError, match="sha256"):
        pull.pull(
            f"{server}/m/bad.gguf",
            name=None,
            sha256=hashlib.sha256(good).hexdigest(),
            config=tmp_path / "c.toml",
            env=env,
        )
    assert not any((tmp_path / "data" / "embedd" / "models").glob("bad.gguf*"))
    assert not (tmp_path / "c.toml").exists()


def test_a_file_that_is_not_gguf_is_refused(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/page.gguf"] = b"<html>not a model</html>"
    with pytest.raises(pull.PullError, match="not a GGUF"):
        pull.pull(f"{server}/m/page.gguf", name=None, sha256=None, config=tmp_path / "c", env=env)


def test_an_existing_model_name_is_not_overwritten(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/mini2.gguf"] = BUNDLED.read_bytes()
    config = tmp_path / "config.toml"
    config.write_text('[models.mini2]\npath = "/elsewhere.gguf"\n')
    with pytest.raises(pull.PullError, match="already has"):
        pull.pull(f"{server}/m/mini2.gguf", name=None, sha256=None, config=config, env=env)


def test_hugging_face_sources_become_resolve_urls() -> None:
    src = pull.parse_source(
        "hf:nomic-ai/nomic-embed-text-v1.5-GGUF/nomic-embed-text-v1.5.Q8_0.gguf"
    )
    assert src.url == (
        "https://huggingface.co/nomic-ai/nomic-embed-text-v1.5-GGUF/resolve/main/"
        "nomic-embed-text-v1.5.Q8_0.gguf"
    )
    assert src.filename == "nomic-embed-text-v1.5.Q8_0.gguf"


def test_the_pull_command_reports_and_exits_zero(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/cli.gguf"] = BUNDLED.read_bytes()
    config = tmp_path / "config.toml"
    out = subprocess.run(
        [sys.executable, "-m", "embedd", "pull", f"{server}/m/cli.gguf", "--name", "cli",
         "--config", str(config)],
        capture_output=True, text=True, timeout=120, env={**env, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "[models.cli]" in config.read_text()
