"""`embedd pull`: download a GGUF embedding model and add it to the user's config.

Standard library only (urllib). The file goes to `$XDG_DATA_HOME/embedd/models` through a
`.part` file that a later run resumes with an HTTP Range request; its sha256 is checked against
`--sha256` or, failing that, what the server publishes (Hugging Face sends the LFS object's
sha256 as `X-Linked-ETag`); it must be GGUF and declare a pooling type (an embedding model);
then `[models.NAME]` is appended to `$XDG_CONFIG_HOME/embedd/config.toml`, keeping whatever the
file already says.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Bytes read per network read (and hashed per file read).
_BLOCK = 1 << 20
# Seconds a connection may stay silent before the download counts as interrupted.
_TIMEOUT = 60.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HF = "https://huggingface.co/{repo}/resolve/main/{file}"


class PullError(Exception):
    """The download or the file cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Source:
    url: str
    filename: str


def parse_source(text: str) -> Source:
    """A URL, or `hf:OWNER/REPO/PATH/FILE.gguf` (a file in a Hugging Face repository)."""
    if text.startswith("hf:"):
        parts = text[3:].split("/")
        if len(parts) < 3 or not parts[-1]:
            raise PullError(f"{text}: expected hf:OWNER/REPO/FILE.gguf")
        repo, file = "/".join(parts[:2]), "/".join(parts[2:])
        return Source(_HF.format(repo=repo, file=file), parts[-1])
    if not text.startswith(("http://", "https://")):
        raise PullError(f"{text}: expected an http(s) URL or hf:OWNER/REPO/FILE.gguf")
    name = text.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise PullError(f"{text}: the URL names no file")
    return Source(text, name)


def models_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "embedd" / "models"


def published_sha256(headers: Mapping[str, str]) -> str | None:
    for key in ("x-linked-etag", "etag"):
        value = headers.get(key, "").strip().strip('"').lower()
        if value.startswith("w/"):
            continue
        if _SHA256.match(value):
            return value
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


class _Bar:
    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.started = time.monotonic()
        self.last = 0.0

    def show(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.last < (0.1 if self.tty else 5.0) and (total is None or done < total):
            return
        self.last = now
        rate = done / max(now - self.started, 1e-6) / 2**20
        of = f" / {total / 2**20:.1f}" if total else ""
        line = f"{done / 2**20:.1f}{of} MB  {rate:.1f} MB/s"
        if self.tty:
            sys.stderr.write("\r" + line.ljust(60))
            sys.stderr.flush()
        else:
            print(line, file=sys.stderr)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def download(source: Source, dest: Path, *, tty: bool = False) -> str | None:
    """Fetch `source` to `dest` (resuming `dest.part`); returns the server's sha256 if known."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(source.url, headers={"User-Agent": "embedd-pull"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the .part is already whole
            part.rename(dest)
            return None
        raise PullError(f"{source.url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PullError(f"{source.url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        resumed = response.status == 206 and have > 0
        if not resumed:
            have = 0
        length = headers.get("content-length")
        total = have + int(length) if length and length.isdigit() else None
        bar = _Bar(tty)
        done = have
        with part.open("ab" if resumed else "wb") as f:
            try:
                while block := response.read(_BLOCK):
                    f.write(block)
                    done += len(block)
                    bar.show(done, total)
            except (OSError, TimeoutError, http.client.HTTPException) as exc:
                raise PullError(
                    f"download interrupted after {done} bytes ({exc}); run the same command "
                    "again to resume"
                ) from None
        bar.close()
        if total is not None and done < total:
            raise PullError(
                f"download interrupted after {done} of {total} bytes; run the same command "
                "again to resume"
            )
    part.rename(dest)
    return published_sha256(headers)


def check_model(path: Path) -> str:
    """Raises PullError unless `path` is a GGUF embedding model; returns its architecture."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise PullError(f"{path.name} is not a GGUF file")
    import ctypes

    import llama_cpp as lc

    from ..inference.engine import install_llama_log

    install_llama_log()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise PullError(f"{path.name}: llama.cpp cannot read this GGUF file")
    try:
        buf = ctypes.create_string_buffer(256)

        def meta(key: str) -> str | None:
            n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode() if n >= 0 else None

        arch = meta("general.architecture") or "unknown"
        pooling = meta(f"{arch}.pooling_type")
        if pooling is None or pooling in ("0", "-1"):
            raise PullError(
                f"{path.name} ({arch}) declares no pooling type: not an embedding model. If it "
                "is one, add it to the config by hand with `pooling = ...`"
            )
        if pooling == "4":
            raise PullError(f"{path.name} is a reranking model, not an embedding model")
        return arch
    finally:
        lc.llama_model_free(model)


def add_to_config(config: Path, name: str, model: Path) -> None:
    """Append `[models.NAME]` to the config file (created if absent), keeping its content."""
    import tomllib

    text = config.read_text() if config.exists() else ""
    if text:
        try:
            existing = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PullError(f"{config} is not valid TOML ({exc}); fix it first") from None
        if name in existing.get("models", {}):
            raise PullError(f"{config} already has [models.{name}]; choose another --name")
    config.parent.mkdir(parents=True, exist_ok=True)
    entry = f'\n[models.{name}]\npath = "{model}"\n'
    with config.open("a") as f:
        if text and not text.endswith("\n"):
            f.write("\n")
        f.write(entry)


def pull(
    source_text: str,
    *,
    name: str | None,
    sha256: str | None,
    config: Path,
    env: Mapping[str, str] | None = None,
    tty: bool = False,
) -> Path:
    source = parse_source(source_text)
    if not source.filename.endswith(".gguf"):
        raise PullError(f"{source.filename}: embedd serves GGUF files (*.gguf)")
    name = name or source.filename.removesuffix(".gguf").lower()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise PullError(f"--name {name!r}: use letters, digits, '-' and '_'")
    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise PullError("--sha256 must be 64 hex digits")
    directory = models_dir(env)
    directory.mkdir(parents=True, exist_ok=True)
    dest = directory / source.filename
    published = None if dest.exists() else download(source, dest, tty=tty)
    expected = (sha256 or published or "").lower() or None
    if expected is not None:
        actual = _sha256(dest)
        if actual != expected:
            dest.unlink()
            raise PullError(
                f"{source.filename}: sha256 is {actual}, expected {expected}: the download is "
                "corrupt or not the file meant; it was deleted"
            )
    try:
        check_model(dest)
    except PullError:
        dest.unlink()
        raise
    add_to_config(config, name, dest)
    return dest
