"""`embedd service install|uninstall`: the systemd units or the launchd agent, filled in.

The unit texts live here (one source of truth); `systemd/` and `launchd/` in the repository
hold them rendered for a typical interpreter path, and a test keeps those files identical to
what this module writes.

- systemd, `--user` (default): `embedd.socket` + `embedd.service` in ~/.config/systemd/user.
  systemd owns the socket (%t/embedd/embedd.sock, 0600 in a 0700 directory) and starts the
  daemon on the first connection (socket activation); the daemon reports readiness, status
  and watchdog pings with sd_notify.
- systemd, `--system`: the same in /etc/systemd/system for a shared machine. The daemon runs
  as the dedicated user `embedd`; the socket /run/embedd/embedd.sock is 0660, group `embedd`,
  and the default config /etc/embedd/config.toml says `allow_gid = "embedd"`, so members of
  that group are served.
- launchd (macOS): a LaunchAgent in ~/Library/LaunchAgents whose `Sockets` entry makes launchd
  own the socket and start the daemon on the first connection.
"""

from __future__ import annotations

import os
import plistlib
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

UNIT = "embedd"
LAUNCHD_LABEL = "local.embedd"
SYSTEM_USER = "embedd"
SYSTEM_GROUP = "embedd"
SYSTEM_SOCKET = Path("/run/embedd/embedd.sock")
SYSTEM_CONFIG = Path("/etc/embedd/config.toml")
# The socket of the LaunchAgent, under the home directory: /tmp is emptied at boot, and
# launchd binds SockPathName before the daemon could create a directory for it.
LAUNCHD_SOCKET = Path(".embedd") / "embedd.sock"

_HARDENING = """\
# Hardening that keeps llama.cpp and models under ~ working: not MemoryDenyWriteExecute=
# (it breaks libffi closures, i.e. the llama.cpp log callback), not PrivateDevices= (it hides
# GPUs), not ProtectHome= (it hides models in home directories).
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX
UMask=0077"""

_SYSTEM_HARDENING = """\
# A system service can be fenced in further: it needs no network (the socket and the notify
# socket are files), no capabilities, and writes nothing outside its state directory. Models
# under /home stay readable (read-only) if their permissions let the embedd user read them.
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateNetwork=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectHostname=yes
CapabilityBoundingSet="""

_SOCKET = """\
# embedd: the socket systemd listens on; the first connection starts embedd.service,
# which serves it (socket activation). Written by `embedd service install`.
[Unit]
Description=embedd text-embedding daemon (socket)

[Socket]
ListenStream={listen}
{ownership}SocketMode={socket_mode}
DirectoryMode={dir_mode}
RemoveOnStop=yes

[Install]
WantedBy=sockets.target
"""

_SERVICE = """\
# embedd: the text-embedding daemon, started by embedd.socket on the first connection.
# Written by `embedd service install`.
[Unit]
Description=embedd text-embedding daemon
Requires=embedd.socket
After=embedd.socket

[Service]
Type=notify
ExecStart={exec_start}
{identity}Restart=on-failure
RestartSec=2
# The daemon pings WATCHDOG=1 from its event loop every WatchdogSec/2: a wedged loop is
# killed and restarted.
WatchdogSec=30
# Preloading a large model may take a while; stopping finishes the requests in flight.
TimeoutStartSec=300
TimeoutStopSec=120
{hardening}

[Install]
Also=embedd.socket
"""

_SYSTEM_CONFIG_TEXT = f"""\
# embedd's config for the system-wide service (written by `embedd service install --system`).
# Members of the group below may use the daemon; add them with
#   usermod -aG {SYSTEM_GROUP} USER
allow_gid = "{SYSTEM_GROUP}"
"""


class ServiceError(Exception):
    """The install or uninstall cannot be done as asked."""


@dataclass
class Plan:
    """What install or uninstall does: files to write or remove, and what to run after."""

    write: list[tuple[Path, str]] = field(default_factory=list)
    remove: list[Path] = field(default_factory=list)
    # Files written only when absent (the system config: never overwrite an admin's edits).
    write_if_absent: list[tuple[Path, str]] = field(default_factory=list)
    mkdirs: list[Path] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _systemd_arg(arg: str) -> str:
    """Quote one ExecStart= argument (systemd.service(5) "Command lines")."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def serve_args(
    python: str, config: Path | None, *, preload: bool = True, idle_exit: float | None = None
) -> list[str]:
    args = [python, "-m", "embedd", "serve"]
    if config is not None:
        args += ["--config", str(config)]
    if preload:
        args += ["--preload", "default"]
    if idle_exit:
        args += ["--idle-exit", f"{idle_exit:g}"]
    return args


def systemd_units(
    python: str,
    *,
    system: bool = False,
    config: Path | None = None,
    preload: bool = True,
    idle_exit: float | None = None,
) -> dict[str, str]:
    """`embedd.socket` and `embedd.service`, as texts."""
    exec_start = " ".join(
        _systemd_arg(a) for a in serve_args(python, config, preload=preload, idle_exit=idle_exit)
    )
    if system:
        socket = _SOCKET.format(
            listen="%t/embedd/embedd.sock",
            ownership=f"SocketUser={SYSTEM_USER}\nSocketGroup={SYSTEM_GROUP}\n",
            socket_mode="0660",
            dir_mode="0755",
        )
        identity = (
            f"User={SYSTEM_USER}\nGroup={SYSTEM_GROUP}\n"
            "# The default config is /etc/embedd/config.toml; HOME is the state directory.\n"
            "Environment=XDG_CONFIG_HOME=/etc HOME=%S/embedd XDG_CACHE_HOME=%C\n"
            "StateDirectory=embedd\nCacheDirectory=embedd\n"
        )
        hardening = _HARDENING + "\n" + _SYSTEM_HARDENING
    else:
        socket = _SOCKET.format(
            listen="%t/embedd/embedd.sock", ownership="", socket_mode="0600", dir_mode="0700"
        )
        identity = ""
        hardening = _HARDENING
    service = _SERVICE.format(exec_start=exec_start, identity=identity, hardening=hardening)
    return {f"{UNIT}.socket": socket, f"{UNIT}.service": service}


def launchd_plist(
    python: str,
    home: Path,
    *,
    config: Path | None = None,
    preload: bool = True,
    idle_exit: float | None = None,
) -> bytes:
    """The LaunchAgent: launchd owns the socket and starts the daemon on the first connection.

    KeepAlive {SuccessfulExit: false} restarts a daemon that crashed (like Restart=on-failure)
    but not one that exited cleanly (`--idle-exit`, `embedd stop`): the next connection starts
    it again. RunAtLoad is false: nothing runs until a client connects.
    """
    log = str(home / "Library" / "Logs" / "embedd.log")
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": serve_args(python, config, preload=preload, idle_exit=idle_exit),
        "Sockets": {
            "Listeners": {
                "SockPathName": str(home / LAUNCHD_SOCKET),
                "SockPathMode": 0o600,  # 384
                "SockType": "stream",  # SockPathName implies the Unix family
            }
        },
        "KeepAlive": {"SuccessfulExit": False},
        "RunAtLoad": False,
        "StandardOutPath": log,
        "StandardErrorPath": log,
        "ProcessType": "Standard",
    }
    return plistlib.dumps(agent, sort_keys=False)


def _under(root: Path | None, path: Path) -> Path:
    """`path` inside `root` (an image being prepared, or a test's directory)."""
    return path if root is None else root / path.relative_to(path.anchor)


def _systemd_user_dir(env: dict[str, str], home: Path) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(home / ".config")
    return Path(base) / "systemd" / "user"


def plan_install(
    *,
    manager: str,
    system: bool,
    python: str,
    config: Path | None,
    preload: bool = True,
    idle_exit: float | None = None,
    root: Path | None = None,
    env: dict[str, str] | None = None,
    home: Path | None = None,
) -> Plan:
    env = dict(os.environ if env is None else env)
    home = home if home is not None else Path.home()
    plan = Plan()
    if manager == "launchd":
        if system:
            raise ServiceError("--system is not supported with launchd: install a LaunchAgent")
        path = _under(root, home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist")
        plist = launchd_plist(python, home, config=config, preload=preload, idle_exit=idle_exit)
        plan.write.append((path, plist.decode()))
        plan.mkdirs.append(_under(root, (home / LAUNCHD_SOCKET).parent))
        plan.commands += [
            f"launchctl bootstrap gui/$(id -u) {path}",
            f'export EMBEDD_SOCKET="{home / LAUNCHD_SOCKET}"   # in your shell profile',
            f'launchctl setenv EMBEDD_SOCKET "{home / LAUNCHD_SOCKET}"   # for GUI apps',
        ]
        return plan
    units = systemd_units(
        python, system=system, config=config, preload=preload, idle_exit=idle_exit
    )
    unit_dir = Path("/etc/systemd/system") if system else _systemd_user_dir(env, home)
    for name, text in units.items():
        plan.write.append((_under(root, unit_dir / name), text))
    if system:
        if config is None:
            plan.write_if_absent.append((_under(root, SYSTEM_CONFIG), _SYSTEM_CONFIG_TEXT))
        plan.commands += [
            f"getent passwd {SYSTEM_USER} >/dev/null || useradd --system --user-group "
            f"--home-dir /var/lib/embedd --shell /usr/sbin/nologin {SYSTEM_USER}",
            "systemctl daemon-reload",
            f"systemctl enable --now {UNIT}.socket",
            f"usermod -aG {SYSTEM_GROUP} USER   # for each user who may use it",
            f"export EMBEDD_SOCKET={SYSTEM_SOCKET}   # for those users (shell profile)",
            f"export EMBEDD_TRUST_UIDS={SYSTEM_USER}   # clients trust a daemon of this user",
        ]
        if os.path.realpath(python).startswith(("/root/", "/home/")):
            plan.notes.append(
                f"{python} is under a home directory: the {SYSTEM_USER} user may not be "
                "able to run it; install embedd in a system location such as /opt/embedd"
            )
    else:
        plan.commands += [
            "systemctl --user daemon-reload",
            f"systemctl --user enable --now {UNIT}.socket",
            "loginctl enable-linger $USER   # optional: keep it available when logged out",
        ]
    return plan


def plan_uninstall(
    *,
    manager: str,
    system: bool,
    root: Path | None = None,
    env: dict[str, str] | None = None,
    home: Path | None = None,
) -> Plan:
    env = dict(os.environ if env is None else env)
    home = home if home is not None else Path.home()
    plan = Plan()
    if manager == "launchd":
        path = _under(root, home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist")
        plan.commands.append(f"launchctl bootout gui/$(id -u)/{LAUNCHD_LABEL}")
        plan.remove.append(path)
        return plan
    unit_dir = Path("/etc/systemd/system") if system else _systemd_user_dir(env, home)
    unit_dir = _under(root, unit_dir)
    names = [f"{UNIT}.socket", f"{UNIT}.service"]
    # What `systemctl disable` removes: the [Install] symlinks pointing at our units.
    for wants in sorted(unit_dir.glob("*.wants")):
        for name in names:
            if (wants / name).is_symlink():
                plan.remove.append(wants / name)
    plan.remove += [unit_dir / name for name in names]
    ctl = "systemctl" if system else "systemctl --user"
    plan.commands += [f"{ctl} stop {UNIT}.socket {UNIT}.service", f"{ctl} daemon-reload"]
    if system:
        plan.notes.append(f"{SYSTEM_CONFIG} and the {SYSTEM_USER} user are left in place")
    return plan


def default_manager() -> str:
    return "launchd" if sys.platform == "darwin" else "systemd"


def execute(plan: Plan, *, dry_run: bool, out: list[str]) -> None:
    """Carry the plan out (or with `dry_run` only describe it), appending lines to `out`."""
    for directory in plan.mkdirs:
        out.append(f"{'would create' if dry_run else 'created'} directory {directory}")
        if not dry_run:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = list(plan.write)
    files += [(p, t) for p, t in plan.write_if_absent if not p.exists()]
    for path, text in files:
        if dry_run:
            out.append(f"--- would write {path}:")
            out += text.rstrip("\n").split("\n")
            out.append("---")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        out.append(f"wrote {path}")
    for path, text in plan.write_if_absent:
        if (path, text) not in files:
            out.append(f"kept {path} (it exists)")
    for path in plan.remove:
        if not (path.exists() or path.is_symlink()):
            continue
        if dry_run:
            out.append(f"would remove {path}")
        else:
            path.unlink()
            out.append(f"removed {path}")
    if plan.commands:
        out.append("then run:" if not dry_run else "and then you would run:")
        out += [f"  {c}" for c in plan.commands]
    out += [f"note: {n}" for n in plan.notes]


def reference_files(python: str = "/usr/bin/python3", home: str = "/Users/you") -> dict[str, str]:
    """The files kept in the repository (systemd/, launchd/): the units for `python`."""
    files = {f"systemd/{n}": t for n, t in systemd_units(python).items()}
    files.update({f"systemd/system/{n}": t for n, t in systemd_units(python, system=True).items()})
    files[f"launchd/{LAUNCHD_LABEL}.plist"] = launchd_plist(python, Path(home)).decode()
    return files


def main(argv: Sequence[str]) -> int:  # pragma: no cover - `python -m embedd.cli.service`
    """Regenerate the repository's reference files: python -m embedd.cli.service write-reference."""
    if list(argv) != ["write-reference"]:
        print("usage: python -m embedd.cli.service write-reference", file=sys.stderr)
        return 2
    repo = Path(__file__).resolve().parents[2]
    for rel, text in reference_files().items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
