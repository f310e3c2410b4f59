"""A client that reaches the wrong socket is told which one it reached, in its own language."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import Daemon


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_on_the_msgpack_socket_gets_an_http_400_naming_the_http_socket(
    daemon: Daemon,
) -> None:
    out = subprocess.run(
        ["curl", "-sS", "-i", "--unix-socket", str(daemon.socket), "http://localhost/health"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 400 Bad Request")
    assert "This is embedd's msgpack socket" in out.stdout and "--http-socket" in out.stdout
    assert daemon.call("health")["ok"]  # and the daemon serves on
