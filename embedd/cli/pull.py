"""`embedd pull`: download a GGUF embedding model and add it to the user's config.

Standard library only (urllib). The file goes to `$XDG_DATA_HOME/embedd/models` through a
`.part` file that a later run resumes with an HTTP Range request; its sha256 is checked against
`--sha256` or, failing that, what the server published when the download began (Hugging Face
sends the LFS object's sha256 as `X-Linked-ETag`; it is kept next to the `.part` so a resumed
download is checked against it too); its size must match what its GGUF header describes, and
llama.cpp must read it and find a pooling type (an embedding model). Only then is it installed
under its name and `[models.NAME]` appended to `$XDG_CONFIG_HOME/embedd/config.toml`, keeping
whatever the file already says.

Bounded: a download larger than `--max-size` (MAX_MODEL_BYTES) is refused, from its declared
length or once it passes the limit, and one that would leave the disk with less than
KEEP_FREE_BYTES free is refused before it starts or stopped when it gets there.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..config import ConfigError, bundled_model, load_config
from ..wire.messages import DEFAULT_MODEL

# Bytes read per network read (and hashed per file read).
_BLOCK = 1 << 20
# Seconds a connection may stay silent before the download counts as interrupted.
_TIMEOUT = 60.0
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HF = "https://huggingface.co/{repo}/resolve/main/{file}"
# The largest download `pull` accepts unless --max-size says otherwise. The largest embedding
# GGUFs published are 7-8 B-parameter models (e5-mistral-7b-instruct, gte-Qwen2-7B-instruct,
# Qwen3-Embedding-8B); at F16, 2 bytes a parameter, 8 B parameters are 16 GB. 20 GiB takes
# those whole and stops a server that sends without end (one sent 8.7 GB before this limit).
MAX_MODEL_BYTES = 20 * 2**30
# Free space a download leaves on the disk it writes to: a disk filled to its last byte breaks
# everything else on it (logs, SQLite journals, editors' saves), not only this download.
KEEP_FREE_BYTES = 512 * 2**20
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-\d+|\*)/(\d+)$")


class PullError(Exception):
    """The download or the file cannot be used; the message says why and what to do."""


class _Restart(Exception):
    """The `.part` cannot be resumed (the server resumes elsewhere, or its file is now another
    size): it is discarded and the download starts from the beginning."""


def parse_size(text: str) -> int:
    """`--max-size`: bytes, or a number with K, M, G or T (powers of 1024; `20G`, `500MiB`)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise PullError(f"--max-size {text!r}: expected a size such as 20G, 500M or 1048576")
    return int(m.group(1)) << (10 * " kmgt".index(m.group(2).lower() or " "))


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def toml_string(text: str) -> str:
    """`text` as a TOML basic string: backslash, quote and every control character escaped
    (TOML forbids them raw), so any path reads back as itself. TOML files are UTF-8: a path
    whose bytes are not UTF-8 cannot be written into one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PullError(f"{text!r} is not UTF-8 and cannot be written into a TOML config") from None
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_TOML_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


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


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _published_file(dest: Path) -> Path:
    """Where the sha256 the server published when this `.part` began is kept: a resumed
    response (206) need not carry it again, and then it is still what the file is checked by."""
    return dest.with_name(dest.name + ".part.sha256")


def discard_part(dest: Path) -> None:
    _part(dest).unlink(missing_ok=True)
    _published_file(dest).unlink(missing_ok=True)


def _check_space(directory: Path, needed: int, keep_free: int) -> None:
    free = shutil.disk_usage(directory).free
    if free - needed < keep_free:
        raise PullError(
            f"{directory} has {_mb(free)} free; this download needs {_mb(needed)} more and "
            f"embedd pull leaves {_mb(keep_free)} free: make room, then run the same command again"
        )


def download(
    source: Source,
    dest: Path,
    *,
    max_bytes: int = MAX_MODEL_BYTES,
    keep_free: int = KEEP_FREE_BYTES,
    tty: bool = False,
) -> Path:
    """Fetch `source` into `dest.part`, resuming it; returns the finished `.part` (the caller
    verifies it before installing it as `dest`). A `.part` that does not resume cleanly is
    discarded and the download starts over."""
    try:
        return _download(source, dest, max_bytes, keep_free, tty)
    except _Restart as why:
        print(f"{source.filename}: {why}; starting over", file=sys.stderr)
        discard_part(dest)
    try:
        return _download(source, dest, max_bytes, keep_free, tty)
    except _Restart as why:  # only a .part can need a restart, and there is none now
        raise PullError(f"{source.url}: {why}") from None


def published_for(dest: Path) -> str | None:
    """The sha256 the server published when the `.part` of `dest` began, if it did."""
    try:
        value = _published_file(dest).read_text().strip()
    except OSError:
        return None
    return value if _SHA256.match(value) else None


def _download(source: Source, dest: Path, max_bytes: int, keep_free: int, tty: bool) -> Path:
    part = _part(dest)
    have = part.stat().st_size if part.exists() else 0
    if have > max_bytes:
        raise _Restart(f"the partial download is {_mb(have)}, over --max-size {_mb(max_bytes)}")
    request = urllib.request.Request(source.url, headers={"User-Agent": "embedd-pull"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after byte `have`: whole, if the sizes agree
            whole = _CONTENT_RANGE.match(exc.headers.get("Content-Range", "").strip())
            if whole and int(whole.group(2)) == have:
                return part
            size = f"{int(whole.group(2))} bytes" if whole else "of unknown size"
            raise _Restart(
                f"the partial download is {have} bytes, the server's file {size}"
            ) from None
        raise PullError(f"{source.url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise PullError(f"{source.url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        headers = {k.lower(): v for k, v in response.headers.items()}
        total = _total(headers)
        resumed = response.status == 206 and have > 0
        if resumed:
            got = _CONTENT_RANGE.match(headers.get("content-range", "").strip())
            if not got or got.group(1) is None or int(got.group(1)) != have:
                raise _Restart(
                    f"asked to resume at byte {have}, the server sent "
                    f"{headers.get('content-range') or 'no Content-Range'}"
                )
            total = int(got.group(2))
        else:
            have = 0
            discard_part(dest)
            if published := published_sha256(headers):
                _published_file(dest).write_text(published + "\n")
        if total is not None and total > max_bytes:
            discard_part(dest)
            raise PullError(
                f"{source.url} is {_mb(total)}, over --max-size {_mb(max_bytes)}; if this is "
                "the model meant, pass a larger --max-size"
            )
        _check_space(part.parent, 0 if total is None else total - have, keep_free)
        with part.open("ab" if resumed else "wb") as f:
            done = _copy(response, f, have, total, part.parent, max_bytes, keep_free, tty)
        if done > max_bytes:
            discard_part(dest)
            raise PullError(
                f"{source.url} sent more than --max-size {_mb(max_bytes)} (and declared no "
                "length): stopped, and the partial file was deleted"
            )
        if total is not None and done < total:
            raise PullError(
                f"download interrupted after {done} of {total} bytes; run the same command "
                "again to resume"
            )
    return part


def _total(headers: Mapping[str, str]) -> int | None:
    length = headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def _copy(
    response: BinaryIO,
    f: BinaryIO,
    done: int,
    total: int | None,
    directory: Path,
    max_bytes: int,
    keep_free: int,
    tty: bool,
) -> int:
    """Copy the body to `f` until it ends, passes `max_bytes` (returns more than it) or the
    disk's free space falls under `keep_free` (PullError naming both; the `.part` is kept to
    resume once there is room)."""
    bar = _Bar(tty)
    try:
        while block := response.read(_BLOCK):
            if done + len(block) > max_bytes:
                return done + len(block)
            f.write(block)
            done += len(block)
            bar.show(done, total)
            free = shutil.disk_usage(directory).free
            if free < keep_free:
                raise PullError(
                    f"stopped after {_mb(done)}: {directory} has {_mb(free)} free, under the "
                    f"{_mb(keep_free)} embedd pull leaves free; make room, then run the same "
                    "command again to resume"
                )
    except (OSError, TimeoutError, http.client.HTTPException) as exc:
        raise PullError(
            f"download interrupted after {done} bytes ({exc}); run the same command again to resume"
        ) from None
    finally:
        bar.close()
    return done


# ggml tensor types: (elements per block, bytes per block), as in ggml's type traits. A file
# with a type not listed here gets no layout check (llama.cpp's own load check still runs).
_GGML_BLOCKS = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
    21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4),
    27: (1, 8), 28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66),
    39: (32, 17),
}  # fmt: skip
# GGUF metadata value types of a fixed size (bytes); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_DEFAULT_ALIGNMENT = 32


class _Header:
    """A bounded reader of a GGUF header: every length is checked against the file's size, so
    a corrupt count cannot make it read or allocate without end."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f = f
        self.size = size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise ValueError("a length runs past the end of the file")
        return self.f.read(n)

    def u32(self) -> int:
        value: int = struct.unpack("<I", self.read(4))[0]
        return value

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.read(8))[0]
        return value

    def string(self) -> bytes:
        return self.read(self.u64())

    def skip(self, kind: int, count: int = 1) -> None:
        if kind in _GGUF_SCALARS:
            self.read(_GGUF_SCALARS[kind] * count)
        elif kind == _GGUF_STRING:
            for _ in range(count):
                self.string()
        elif kind == _GGUF_ARRAY and count == 1:
            inner, n = self.u32(), self.u64()
            if inner == _GGUF_ARRAY or n > self.size:
                raise ValueError("a malformed array")
            self.skip(inner, n)
        else:
            raise ValueError(f"unknown metadata type {kind}")


def gguf_data_end(path: Path) -> int | None:
    """Where the GGUF file's last tensor ends, from its header (tensor offsets, shapes and
    types, and the alignment); None if it uses a tensor type not in the table. Raises
    ValueError when the header cannot be read."""
    size = path.stat().st_size
    with path.open("rb") as f:
        h = _Header(f, size)
        if h.read(4) != b"GGUF":
            raise ValueError("no GGUF magic")
        if h.u32() < 2:
            raise ValueError("GGUF version 1 is not supported")
        n_tensors, n_kv = h.u64(), h.u64()
        if n_tensors > size or n_kv > size:
            raise ValueError("tensor or metadata counts larger than the file")
        alignment = _GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key, kind = h.string(), h.u32()
            if key == b"general.alignment" and kind == 4:
                alignment = h.u32()
            else:
                h.skip(kind)
        end = 0
        known = True
        for _ in range(n_tensors):
            h.string()
            dims = [h.u64() for _ in range(h.u32())]
            kind, offset = h.u32(), h.u64()
            if kind not in _GGML_BLOCKS:
                known = False
                continue
            per_block, block_bytes = _GGML_BLOCKS[kind]
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // per_block * block_bytes)
        if alignment <= 0:
            raise ValueError(f"alignment {alignment}")
        data_start = -(-f.tell() // alignment) * alignment
    return data_start + end if known else None


def check_layout(path: Path, shown: str) -> None:
    """Raises PullError unless `path` is as long as its GGUF header says: a resume appended at
    the wrong place, or a server's file that changed between two runs, leaves a file whose
    header llama.cpp reads happily (it reads tensors lazily) but whose weights are not the
    model's. The writers pad the last tensor to the alignment, or not."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise PullError(f"{shown} is not a GGUF file")
    try:
        end = gguf_data_end(path)
    except ValueError as exc:
        raise PullError(f"{shown} is not a readable GGUF file ({exc})") from None
    if end is None:
        return
    size = path.stat().st_size
    alignment_slack = 4096  # no writer pads more than its alignment; GGUF's largest in use
    if not end <= size <= end + alignment_slack:
        raise PullError(
            f"{shown} is {size} bytes but its GGUF header describes {end}: the download is "
            "corrupt or incomplete"
        )


def check_model(path: Path, shown: str | None = None) -> str:
    """Raises PullError unless `path` is a GGUF embedding model; returns its architecture.
    `shown` is the name messages use (the file's, by default)."""
    shown = shown or path.name
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise PullError(f"{shown} is not a GGUF file")
    import ctypes

    import llama_cpp as lc

    from ..inference.engine import install_llama_log

    install_llama_log()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise PullError(f"{shown}: llama.cpp cannot read this GGUF file")
    try:
        buf = ctypes.create_string_buffer(256)

        def meta(key: str) -> str | None:
            n = lc.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
            return buf.value.decode() if n >= 0 else None

        arch = meta("general.architecture") or "unknown"
        pooling = meta(f"{arch}.pooling_type")
        if pooling is None or pooling in ("0", "-1"):
            raise PullError(
                f"{shown} ({arch}) declares no pooling type: not an embedding model. If it "
                "is one, add it to the config by hand with `pooling = ...`"
            )
        if pooling == "4":
            raise PullError(f"{shown} is a reranking model, not an embedding model")
        return arch
    finally:
        lc.llama_model_free(model)


def check_config(config: Path, name: str) -> str:
    """The config's text, if it is valid TOML without a `[models.NAME]` and the daemon would
    take it with NAME added; else PullError. Run before the download as well as before the
    write: a name already taken is known at once, and a pull never leaves a config that stops
    `embedd serve` (a model named after an alias of another, `all-minilm` say, would)."""
    import tomllib

    text = config.read_text() if config.exists() else ""
    if text:
        try:
            existing = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PullError(f"{config} is not valid TOML ({exc}); fix it first") from None
        if name in existing.get("models", {}):
            raise PullError(f"{config} already has [models.{name}]; choose another --name")
    try:
        models = load_config(config).models if text else {DEFAULT_MODEL: bundled_model()}
    except ConfigError as exc:
        raise PullError(f"the daemon refuses the config as it is ({exc}); fix it first") from None
    for model in models.values():
        if name == model.name or name in model.aliases:
            what = "the name" if name == model.name else "an alias"
            bundled = " (the bundled model)" if model.path == bundled_model().path else ""
            raise PullError(
                f"{name!r} is already {what} of model {model.name!r}{bundled}, and one name "
                "means one model; choose another --name"
            )
    return text


def add_to_config(config: Path, name: str, model: Path) -> None:
    """Append `[models.NAME]` to the config file (created if absent), keeping its content."""
    text = check_config(config, name)
    config.parent.mkdir(parents=True, exist_ok=True)
    entry = f"\n[models.{name}]\npath = {toml_string(str(model))}\n"
    with config.open("a") as f:
        if text and not text.endswith("\n"):
            f.write("\n")
        f.write(entry)


def remove(config: Path, name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Take `[models.NAME]` (and its sub-tables) out of the config, keeping every other line,
    and delete the model's file if `pull` put it there (under `models_dir`); a file of the
    user's own elsewhere is left alone. Returns the deleted file, if any."""
    import tomllib

    text = config.read_text() if config.exists() else ""
    try:
        table = tomllib.loads(text).get("models", {}).get(name)
    except tomllib.TOMLDecodeError as exc:
        raise PullError(f"{config} is not valid TOML ({exc}); fix it first") from None
    if not isinstance(table, dict):
        raise PullError(f"{config} has no [models.{name}]")
    kept: list[str] = []
    inside = False
    for line in text.splitlines(keepends=True):
        header = line.strip()
        if header.startswith("["):
            inside = header in (f"[models.{name}]", f'[models."{name}"]') or header.startswith(
                (f"[models.{name}.", f'[models."{name}".')
            )
        if not inside:
            kept.append(line)
    remaining = "".join(kept)
    try:
        if name in tomllib.loads(remaining).get("models", {}):
            raise PullError(f"cannot take [models.{name}] out of {config}: edit it by hand")
    except tomllib.TOMLDecodeError:
        raise PullError(f"cannot take [models.{name}] out of {config}: edit it by hand") from None
    tmp = config.with_name(config.name + ".tmp")
    tmp.write_text(remaining)
    os.replace(tmp, config)
    model = Path(os.path.expanduser(str(table.get("path", ""))))
    if not model.is_absolute():
        model = config.parent / model
    ours = models_dir(env).resolve()
    if model.is_file() and ours in model.resolve().parents:
        model.unlink()
        discard_part(model)
        return model
    return None


def pull(
    source_text: str,
    *,
    name: str | None,
    sha256: str | None,
    config: Path,
    env: Mapping[str, str] | None = None,
    max_bytes: int = MAX_MODEL_BYTES,
    keep_free: int = KEEP_FREE_BYTES,
    tty: bool = False,
) -> Path:
    """Download, verify and register a model; returns where it was installed. Everything that
    can refuse without the file (the name, the config, the path's TOML form) is checked first."""
    source = parse_source(source_text)
    if not source.filename.endswith(".gguf"):
        raise PullError(f"{source.filename}: embedd serves GGUF files (*.gguf)")
    name = name or source.filename.removesuffix(".gguf").lower()
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise PullError(f"--name {name!r}: use letters, digits, '-' and '_'")
    if sha256 is not None and not _SHA256.match(sha256.lower()):
        raise PullError("--sha256 must be 64 hex digits")
    check_config(config, name)
    directory = models_dir(env)
    dest = directory / source.filename
    toml_string(str(dest))
    directory.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # pulled before (for another config, say): verified again
        candidate, published = dest, None
    else:
        candidate = download(source, dest, max_bytes=max_bytes, keep_free=keep_free, tty=tty)
        published = published_for(dest)
    try:
        verify(candidate, source.filename, (sha256 or published or "").lower() or None)
    except PullError:
        candidate.unlink()
        discard_part(dest)
        raise
    if candidate != dest:
        candidate.rename(dest)
        discard_part(dest)
    add_to_config(config, name, dest)
    return dest


def verify(path: Path, shown: str, expected_sha256: str | None) -> None:
    """Raises PullError unless `path` is the model meant: its sha256 (when one is known), its
    size against its GGUF header, and llama.cpp's own reading of it as an embedding model."""
    if expected_sha256 is not None:
        actual = _sha256(path)
        if actual != expected_sha256:
            raise PullError(
                f"{shown}: sha256 is {actual}, expected {expected_sha256}: the download is "
                "corrupt or not the file meant; it was deleted"
            )
    check_layout(path, shown)
    check_model(path, shown)
