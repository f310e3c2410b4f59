"""`embedd pull` against an HTTP server this test starts on 127.0.0.1 (no hub is reachable):
resume after an interrupted download, a corrupt file refused, the config entry added."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from embedd.cli import pull
from embedd.config import load_config
from tests.conftest import BUNDLED, Daemon, start_daemon


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support (416 past the end); `cut_once` makes the first response
    stop early; `resume_from_zero` answers a Range with the whole file as a 206 (a broken
    resume); `declared` sends only headers claiming a length; `endless` sends zeros without a
    length until the client goes away (at most `_ENDLESS_CAP`)."""

    files: ClassVar[dict[str, bytes]] = {}
    cut_once: ClassVar[set[str]] = set()
    resume_from_zero: ClassVar[set[str]] = set()
    declared: ClassVar[dict[str, int]] = {}
    endless: ClassVar[set[str]] = set()
    ranges: ClassVar[list[str | None]] = []
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path in self.declared:
            self.send_response(200)
            self.send_header("Content-Length", str(self.declared[self.path]))
            self.end_headers()
            return
        if self.path in self.endless:
            self.send_response(200)
            self.end_headers()
            block = bytes(_BLOCK)
            try:
                for _ in range(_ENDLESS_CAP // _BLOCK):
                    self.wfile.write(block)
            except OSError:
                pass
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.ranges.append(self.headers.get("Range"))
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if self.path in self.resume_from_zero:
                start = 0
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
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


_BLOCK = 1 << 20
# Bounds the test server's endless body, so a client that never stops still ends the test.
_ENDLESS_CAP = 1 << 30


@pytest.fixture
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
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


def _models(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "data" / "embedd" / "models").glob("*"))


# --------------------------------------------------------------------------------------------
# The config entry: a path read back as itself, whatever its characters


def test_the_config_entry_escapes_quotes_backslashes_and_control_characters(
    server: str, tmp_path: Path
) -> None:
    _Files.files['/m/we"ird\\b.gguf'] = BUNDLED.read_bytes()
    env = {"XDG_DATA_HOME": str(tmp_path / "da\tta")}
    config = tmp_path / "config.toml"
    path = pull.pull(
        f'{server}/m/we"ird\\b.gguf', name="weird", sha256=None, config=config, env=env
    )
    assert path.name == 'we"ird\\b.gguf'
    assert load_config(config).models["weird"].path == path


def test_toml_strings_read_back_as_the_text_written() -> None:
    text = "".join(map(chr, range(0x80))) + "é€😀"
    assert tomllib.loads(f"x = {pull.toml_string(text)}")["x"] == text


# --------------------------------------------------------------------------------------------
# Refused before downloading


def test_a_name_already_in_the_config_is_refused_before_downloading(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/taken.gguf"] = BUNDLED.read_bytes()
    _Files.requests.clear()
    config = tmp_path / "config.toml"
    config.write_text('[models.taken]\npath = "/elsewhere.gguf"\n')
    with pytest.raises(pull.PullError, match="already has"):
        pull.pull(f"{server}/m/taken.gguf", name=None, sha256=None, config=config, env=env)
    assert _Files.requests == []
    assert not (tmp_path / "data").exists()


def test_a_name_that_is_an_alias_of_the_bundled_model_is_refused_before_downloading(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    # The file's name makes the model's: `all-minilm` is an alias of the bundled model, and a
    # [models.all-minilm] would stop `embedd serve` (one name, one model).
    _Files.files["/m/all-minilm.gguf"] = BUNDLED.read_bytes()
    _Files.requests.clear()
    config = tmp_path / "config.toml"
    with pytest.raises(pull.PullError, match="alias of model 'default' \\(the bundled model\\)"):
        pull.pull(f"{server}/m/all-minilm.gguf", name=None, sha256=None, config=config, env=env)
    assert _Files.requests == [] and not config.exists()


def test_a_name_that_is_an_alias_in_the_config_is_refused_before_downloading(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/mine.gguf"] = BUNDLED.read_bytes()
    _Files.requests.clear()
    config = tmp_path / "config.toml"
    config.write_text(f'[models.other]\npath = "{BUNDLED}"\naliases = ["mine"]\n')
    with pytest.raises(pull.PullError, match="alias of model 'other'"):
        pull.pull(f"{server}/m/mine.gguf", name=None, sha256=None, config=config, env=env)
    assert _Files.requests == []


def test_the_config_a_pull_writes_starts_the_daemon_and_serves_the_model(
    server: str, env: dict[str, str], workdir: Path, own_daemon: list[Daemon]
) -> None:
    _Files.files["/m/all-minilm.gguf"] = BUNDLED.read_bytes()
    config = workdir / "pulled.toml"
    pull.pull(f"{server}/m/all-minilm.gguf", name="minilm", sha256=None, config=config, env=env)
    d = start_daemon(workdir, config.read_text().replace("{", "{{").replace("}", "}}"))
    own_daemon.append(d)
    same = d.call("embed", model="all-minilm", input="one name, one model")
    pulled = d.call("embed", model="minilm", input="one name, one model")
    assert pulled["embeddings"] == same["embeddings"]


def test_a_declared_length_over_max_size_is_refused_before_downloading(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.declared["/m/huge.gguf"] = 5 * 2**30
    with pytest.raises(pull.PullError) as err:
        pull.pull(f"{server}/m/huge.gguf", name=None, sha256=None, config=tmp_path / "c.toml",
                  env=env, max_bytes=2**30)  # fmt: skip
    assert "is 5,120.0 MiB, over --max-size 1,024.0 MiB" in str(err.value)
    assert _models(tmp_path) == []


def test_a_declared_length_over_the_free_space_is_refused_before_downloading(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    declared = shutil.disk_usage(tmp_path).free + 2**30
    _Files.declared["/m/large.gguf"] = declared
    with pytest.raises(pull.PullError) as err:
        pull.pull(f"{server}/m/large.gguf", name=None, sha256=None, config=tmp_path / "c.toml",
                  env=env, max_bytes=2**62)  # fmt: skip
    message = str(err.value)
    assert re.search(r"has [\d,.]+ MiB free; this download needs ", message), message
    assert f"needs {declared / 2**20:,.1f} MiB more and embedd pull leaves 512.0 MiB" in message
    assert _models(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Stopped during the download


def test_a_body_without_a_length_is_stopped_at_max_size_and_deleted(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.endless.add("/m/endless.gguf")
    with pytest.raises(pull.PullError, match=r"sent more than --max-size 8.0 MiB"):
        pull.pull(f"{server}/m/endless.gguf", name=None, sha256=None, config=tmp_path / "c",
                  env=env, max_bytes=8 * 2**20)  # fmt: skip
    assert _models(tmp_path) == []


# How far under today's free space the test sets the space to keep: the download stops after
# about this much, whatever else the machine writes meanwhile.
_FREE_MARGIN = 64 * 2**20


def test_a_download_stops_when_the_disk_falls_under_the_space_kept_free(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.endless.add("/m/filling.gguf")
    keep = shutil.disk_usage(tmp_path).free - _FREE_MARGIN
    with pytest.raises(pull.PullError) as err:
        pull.pull(f"{server}/m/filling.gguf", name=None, sha256=None, config=tmp_path / "c",
                  env=env, max_bytes=2**62, keep_free=keep)  # fmt: skip
    message = str(err.value)
    assert re.match(r"stopped after [\d,.]+ MiB: .* has [\d,.]+ MiB free, under the ", message)
    assert f"under the {keep / 2**20:,.1f} MiB embedd pull leaves free" in message
    assert _models(tmp_path) == ["filling.gguf.part"]  # kept, to resume once there is room
    pull.discard_part(tmp_path / "data" / "embedd" / "models" / "filling.gguf")


# --------------------------------------------------------------------------------------------
# What is installed is the file meant, resumed or not


def test_a_part_the_server_resumes_at_another_offset_is_discarded_and_downloaded_again(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/offset.gguf"] = BUNDLED.read_bytes()
    _Files.cut_once.add("/m/offset.gguf")
    _Files.resume_from_zero.add("/m/offset.gguf")
    config = tmp_path / "c.toml"
    with pytest.raises(pull.PullError, match="resume"):
        pull.pull(f"{server}/m/offset.gguf", name=None, sha256=None, config=config, env=env)
    path = pull.pull(f"{server}/m/offset.gguf", name=None, sha256=None, config=config, env=env)
    assert path.read_bytes() == BUNDLED.read_bytes()
    assert _models(tmp_path) == ["offset.gguf"]


def test_a_part_longer_than_the_servers_file_is_discarded_and_downloaded_again(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    _Files.files["/m/longer.gguf"] = BUNDLED.read_bytes()
    models = tmp_path / "data" / "embedd" / "models"
    models.mkdir(parents=True)
    (models / "longer.gguf.part").write_bytes(BUNDLED.read_bytes() + b"left over" * 1000)
    path = pull.pull(
        f"{server}/m/longer.gguf", name=None, sha256=None, config=tmp_path / "c.toml", env=env
    )
    assert path.read_bytes() == BUNDLED.read_bytes()


def test_a_resumed_download_is_checked_against_the_sha256_published_when_it_began(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    original = BUNDLED.read_bytes()
    _Files.files["/m/changed.gguf"] = original
    _Files.cut_once.add("/m/changed.gguf")
    config = tmp_path / "c.toml"
    with pytest.raises(pull.PullError, match="resume"):
        pull.pull(f"{server}/m/changed.gguf", name=None, sha256=None, config=config, env=env)
    # The server's file changes between the two runs (same length, other weights at the end).
    _Files.files["/m/changed.gguf"] = original[:-4096] + bytes(4096)
    with pytest.raises(
        pull.PullError, match="sha256 is .*, expected " + hashlib.sha256(original).hexdigest()
    ):
        pull.pull(f"{server}/m/changed.gguf", name=None, sha256=None, config=config, env=env)
    assert _models(tmp_path) == []
    assert not config.exists()


def test_a_file_longer_than_its_gguf_header_describes_is_refused_and_deleted(
    server: str, env: dict[str, str], tmp_path: Path
) -> None:
    good = BUNDLED.read_bytes()
    _Files.files["/m/padded.gguf"] = good + bytes(8192)
    with pytest.raises(pull.PullError) as err:
        pull.pull(f"{server}/m/padded.gguf", name=None, sha256=None, config=tmp_path / "c",
                  env=env)  # fmt: skip
    assert f"is {len(good) + 8192} bytes but its GGUF header describes {len(good)}" in str(
        err.value
    )
    assert _models(tmp_path) == []


def test_the_ggml_block_sizes_are_those_of_the_gguf_package() -> None:
    import gguf

    theirs = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert {k: theirs[k] for k in pull._GGML_BLOCKS} == pull._GGML_BLOCKS


def test_max_size_takes_bytes_or_k_m_g_t() -> None:
    assert [pull.parse_size(s) for s in ("1048576", "500M", "20G", "2TiB", "64k")] == [
        2**20,
        500 * 2**20,
        20 * 2**30,
        2 * 2**40,
        64 * 2**10,
    ]


def test_remove_takes_the_models_tables_out_and_deletes_the_file_pull_downloaded(
    tmp_path: Path,
) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data")}
    model = pull.models_dir(env) / "e5.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"GGUF")
    config = tmp_path / "config.toml"
    config.write_text(
        'cache_bytes = 0\n\n[models.keep]\npath = "keep.gguf"\n\n'
        f"[models.e5]\npath = {pull.toml_string(str(model))}\n"
        '[models.e5.prompts]\nquery = "query: "\n\n[models.other]\npath = "o.gguf"\n'
    )
    assert pull.remove(config, "e5", env) == model
    assert not model.exists()
    loaded = load_config(config, env={})
    assert set(loaded.models) == {"default", "keep", "other"} and loaded.cache_bytes == 0


def test_remove_keeps_a_model_file_pull_did_not_download(tmp_path: Path) -> None:
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(b"GGUF")
    config = tmp_path / "config.toml"
    config.write_text(f"[models.mine]\npath = {pull.toml_string(str(mine))}\n")
    assert pull.remove(config, "mine", {"XDG_DATA_HOME": str(tmp_path / "data")}) is None
    assert mine.exists() and "mine" not in load_config(config, env={}).models


def test_remove_of_a_name_not_in_the_config_says_so(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[models.a]\npath = "a.gguf"\n')
    with pytest.raises(pull.PullError, match=r"has no \[models.b\]"):
        pull.remove(config, "b", {})
