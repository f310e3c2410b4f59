"""`embedd service install/uninstall`, the unit files (checked by systemd-analyze verify), the
LaunchAgent plist, and the new config keys."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedd.cli import service
from embedd.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def systemd_analyze() -> Iterator[str]:
    """systemd-analyze, installed from Debian's `systemd` package when missing and possible."""
    found = shutil.which("systemd-analyze")
    if found is None and sys.platform == "linux" and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "systemd"]
        for cmd in (install, ["apt-get", "update"], install):  # update only if install fails
            done = subprocess.run(cmd, capture_output=True, timeout=900, env=env)
            if cmd is install and done.returncode == 0:
                break
        found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip(
            "systemd-analyze is missing and cannot be installed here (needs Linux, root and "
            "apt-get); the unit files are not verified"
        )
    yield found


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "embedd", "service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=REPO,
    )


def _verify(tool: str, units: list[Path], *, user: bool, runtime: Path) -> None:
    cmd = [tool, *(["--user"] if user else []), "verify", *map(str, units)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}  # --user needs a runtime dir
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    # verify exits 0 on mere warnings (unknown keys, bad values): any output is a failure.
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), (
        out.stdout + out.stderr
    )


def test_user_units_are_written_filled_in_and_pass_systemd_analyze_verify(
    systemd_analyze: str, workdir: Path
) -> None:
    home = Path("/home/someone")
    config = workdir / "embedd.toml"
    env = {k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(home)
    root = workdir / "root"
    out = _cli(
        "install", "--user", "--root", str(root), "--config", str(config), "--idle-exit", "600",
        env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    unit_dir = root / "home/someone/.config/systemd/user"
    sock, svc = unit_dir / "embedd.socket", unit_dir / "embedd.service"
    assert "systemctl --user enable --now embedd.socket" in out.stdout
    socket_text, service_text = sock.read_text(), svc.read_text()
    assert "ListenStream=%t/embedd/embedd.sock" in socket_text
    assert "SocketMode=0600" in socket_text and "DirectoryMode=0700" in socket_text
    exec_start = f"ExecStart={sys.executable} -m embedd serve --config {config} "
    assert exec_start + "--preload default --idle-exit 600" in service_text
    for line in ("Type=notify", "Restart=on-failure", "WatchdogSec=30", "NoNewPrivileges=yes"):
        assert line in service_text.splitlines()
    # Hardening that would break llama.cpp, GPUs or models in ~ is left out.
    for key in ("MemoryDenyWriteExecute=", "PrivateDevices=", "ProtectHome="):
        assert not any(line.startswith(key) for line in service_text.splitlines())
    _verify(systemd_analyze, [sock, svc], user=True, runtime=workdir)


def test_system_units_and_config_pass_verify(systemd_analyze: str, workdir: Path) -> None:
    root = workdir / "root"
    out = _cli("install", "--system", "--root", str(root))
    assert out.returncode == 0, out.stderr
    unit_dir = root / "etc/systemd/system"
    sock, svc = unit_dir / "embedd.socket", unit_dir / "embedd.service"
    socket_lines = sock.read_text().splitlines()
    for line in ("SocketMode=0660", "SocketGroup=embedd", "SocketUser=embedd"):
        assert line in socket_lines
    service_lines = svc.read_text().splitlines()
    assert "User=embedd" in service_lines and "ProtectSystem=strict" in service_lines
    assert not any(line.startswith("MemoryDenyWriteExecute=") for line in service_lines)
    assert not any(line.startswith("PrivateDevices=") for line in service_lines)
    config = tomllib.loads((root / "etc/embedd/config.toml").read_text())
    assert config == {"allow_gid": "embedd"}
    assert "useradd --system" in out.stdout and "usermod -aG embedd" in out.stdout
    _verify(systemd_analyze, [sock, svc], user=False, runtime=workdir)
    # A second install keeps the admin's config.
    (root / "etc/embedd/config.toml").write_text('allow_gid = "staff"\n')
    again = _cli("install", "--system", "--root", str(root))
    assert "kept " in again.stdout
    assert "staff" in (root / "etc/embedd/config.toml").read_text()


def test_verify_does_catch_a_broken_unit(systemd_analyze: str, workdir: Path) -> None:
    # The check above is only worth something if a mistake fails it.
    units = service.systemd_units(sys.executable)
    (workdir / "embedd.socket").write_text(units["embedd.socket"])
    (workdir / "embedd.service").write_text(
        units["embedd.service"].replace("Type=notify", "Type=notfy")
    )
    with pytest.raises(AssertionError, match="notfy"):
        _verify(
            systemd_analyze,
            [workdir / "embedd.socket", workdir / "embedd.service"],
            user=False,
            runtime=workdir,
        )


def test_the_repository_units_are_what_install_writes() -> None:
    for rel, text in service.reference_files().items():
        assert (REPO / rel).read_text() == text, (
            f"{rel} is stale: python -m embedd.cli.service write-reference"
        )


def test_launchd_plist_keys(workdir: Path) -> None:
    env = {**os.environ, "HOME": "/Users/someone"}
    out = _cli("install", "--manager", "launchd", "--root", str(workdir), env=env)
    assert out.returncode == 0, out.stderr
    path = workdir / "Users/someone/Library/LaunchAgents/local.embedd.plist"
    for agent in (
        plistlib.loads(path.read_bytes()),
        plistlib.loads((REPO / "launchd/local.embedd.plist").read_bytes()),
    ):
        assert agent["Label"] == "local.embedd"
        assert agent["ProgramArguments"][1:4] == ["-m", "embedd", "serve"]
        listener = agent["Sockets"]["Listeners"]
        assert listener["SockPathMode"] == 384 == 0o600
        assert listener["SockPathName"].startswith("/")
        assert len(listener["SockPathName"].encode()) < 104  # macOS sun_path
        assert agent["KeepAlive"] == {"SuccessfulExit": False}  # restart on crash only
        assert agent["RunAtLoad"] is False  # started by the first connection
        assert agent["StandardErrorPath"].endswith("Library/Logs/embedd.log")
    agent = plistlib.loads(path.read_bytes())
    assert agent["ProgramArguments"][0] == sys.executable
    assert agent["Sockets"]["Listeners"]["SockPathName"] == "/Users/someone/.embedd/embedd.sock"
    assert (workdir / "Users/someone/.embedd").is_dir()  # the socket's directory
    assert "launchctl bootstrap gui/" in out.stdout
    assert "EMBEDD_SOCKET" in out.stdout


def test_dry_run_prints_and_writes_nothing(workdir: Path) -> None:
    out = _cli("install", "--user", "--dry-run", "--root", str(workdir / "root"))
    assert out.returncode == 0, out.stderr
    assert "would write" in out.stdout and "ExecStart=" in out.stdout
    assert not (workdir / "root").exists()
    out = _cli("uninstall", "--dry-run", "--root", str(workdir / "root"))
    assert out.returncode == 0, out.stderr


def test_uninstall_removes_the_units_and_their_enablement_links(workdir: Path) -> None:
    env = {**os.environ, "HOME": "/home/someone", "XDG_CONFIG_HOME": ""}
    root = workdir / "root"
    assert _cli("install", "--root", str(root), env=env).returncode == 0
    unit_dir = root / "home/someone/.config/systemd/user"
    wants = unit_dir / "sockets.target.wants"
    wants.mkdir()
    (wants / "embedd.socket").symlink_to(unit_dir / "embedd.socket")  # systemctl enable
    (unit_dir / "other.service").write_text("[Service]\nExecStart=/bin/true\n")
    out = _cli("uninstall", "--root", str(root), env=env)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in unit_dir.rglob("*")) == ["other.service", "sockets.target.wants"]
    assert "systemctl --user stop embedd.socket embedd.service" in out.stdout


def test_launchd_has_no_system_variant(workdir: Path) -> None:
    out = _cli("install", "--manager", "launchd", "--system", "--root", str(workdir))
    assert out.returncode == 2 and "--system is not supported with launchd" in out.stderr


def test_service_config_keys(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text(
        'allow_uids = ["root", 4321]\nallow_gid = "root"\nidle_exit = 90\npreload = ["default"]\n'
    )
    config = load_config(cfg, env={})
    assert config.allow_uids == (0, 4321)
    assert config.allow_gid == 0
    assert config.idle_exit == 90.0
    assert config.preload == ("default",)
    for bad, message in (
        ('preload = ["nope"]', "no model named 'nope'"),
        ('allow_uids = ["no-such-user-here"]', "no user named"),
        ('allow_gid = "no-such-group-here"', "no group named"),
        ("allow_gid = 1.5", "allow_gid must be an integer or a name"),
        ("idle_exit = -1", "idle_exit must be >= 0"),
        ('allow_uids = "root"', "allow_uids must be a list"),
    ):
        cfg.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, env={})


def test_serve_refuses_to_preload_an_unknown_model(workdir: Path) -> None:
    (workdir / "empty.toml").write_text("")
    serve = [sys.executable, "-m", "embedd", "serve", "--socket", str(workdir / "s.sock")]
    out = subprocess.run(
        [*serve, "--preload", "nope", "--config", str(workdir / "empty.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--preload nope: no model of that name is configured" in out.stderr


def test_windows_pipe_code_type_checks_for_win32() -> None:
    # The named-pipe listener cannot run here; mypy --strict checks it as Windows sees it (on
    # Linux it is unreachable and not checked at all). The client has no Windows path to check.
    files = ["embedd/transport/winpipe.py"]
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--platform", "win32", *files],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    from embedd.transport.winpipe import pipe_name

    assert pipe_name("alice") == "\\\\.\\pipe\\embedd-alice"
