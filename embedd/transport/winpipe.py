"""Windows: serve the protocol on the named pipe \\\\.\\pipe\\embedd-<user>.

NOT TESTED ON WINDOWS (see the README's Platform status): this is type-checked for win32 (mypy
--platform win32, run by tests/test_service.py) but has never run. It is kept small on purpose.

asyncio's own `start_serving_pipe` creates its pipes with the default security descriptor and
accepts remote clients, so the pipes are created here instead, each instance with:
- a protected DACL granting access to the current user only (SDDL `D:P(A;;GA;;;<user SID>)`);
- `PIPE_REJECT_REMOTE_CLIENTS`, so that connections over the network (SMB) are refused;
- `FILE_FLAG_FIRST_PIPE_INSTANCE` on the first one, so a second daemon of the same user fails
  instead of sharing the name.
Connections are then served by the proactor event loop (the default on Windows) through the
same StreamReader/StreamWriter handler as Unix sockets.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
from collections.abc import Awaitable, Callable

_log = logging.getLogger("embedd.winpipe")

ClientHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

PIPE_PREFIX = "\\\\.\\pipe\\"


def pipe_name(user: str | None = None) -> str:
    """The daemon's pipe for `user` (default: the current user)."""
    return f"{PIPE_PREFIX}embedd-{user or getpass.getuser()}"


if sys.platform == "win32":
    import _winapi
    import ctypes
    from asyncio import windows_utils
    from ctypes import wintypes
    from typing import Any

    _PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
    _PIPE_TYPE_BYTE = 0x0
    _PIPE_READMODE_BYTE = 0x0
    _TOKEN_QUERY = 0x0008
    _TOKEN_USER = 1
    _SDDL_REVISION_1 = 1
    _BUFSIZE = 256 * 1024

    class _SecurityAttributes(ctypes.Structure):
        _fields_ = [
            ("nLength", wintypes.DWORD),
            ("lpSecurityDescriptor", wintypes.LPVOID),
            ("bInheritHandle", wintypes.BOOL),
        ]

    def _current_user_sid() -> str:
        advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = wintypes.HANDLE
        token = wintypes.HANDLE()
        if not advapi32.OpenProcessToken(
            kernel32.GetCurrentProcess(), _TOKEN_QUERY, ctypes.byref(token)
        ):
            raise ctypes.WinError(ctypes.get_last_error())
        try:
            size = wintypes.DWORD(0)
            advapi32.GetTokenInformation(token, _TOKEN_USER, None, 0, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            if not advapi32.GetTokenInformation(token, _TOKEN_USER, buf, size, ctypes.byref(size)):
                raise ctypes.WinError(ctypes.get_last_error())
            # TOKEN_USER begins with SID_AND_ATTRIBUTES, whose first field is the PSID.
            psid = ctypes.cast(buf, ctypes.POINTER(ctypes.c_void_p))[0]
            text = wintypes.LPWSTR()
            if not advapi32.ConvertSidToStringSidW(ctypes.c_void_p(psid), ctypes.byref(text)):
                raise ctypes.WinError(ctypes.get_last_error())
            try:
                return str(text.value)
            finally:
                kernel32.LocalFree(text)
        finally:
            kernel32.CloseHandle(token)

    def _owner_only() -> _SecurityAttributes:
        """Security attributes whose DACL lets only the current user open the pipe."""
        advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
        descriptor = ctypes.c_void_p()
        sddl = f"D:P(A;;GA;;;{_current_user_sid()})"
        if not advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(
            sddl, _SDDL_REVISION_1, ctypes.byref(descriptor), None
        ):
            raise ctypes.WinError(ctypes.get_last_error())
        # The descriptor lives as long as the process (one per daemon): never freed.
        return _SecurityAttributes(ctypes.sizeof(_SecurityAttributes), descriptor, False)

    class PipeListener:
        """Accepts clients on the pipe `name` and hands each to `handler`."""

        def __init__(self, name: str, handler: ClientHandler) -> None:
            self.name = name
            self.handler = handler
            self._attributes = _owner_only()
            self._task: asyncio.Task[None] | None = None
            self._first = True

        def _new_instance(self) -> windows_utils.PipeHandle:
            open_mode = _winapi.PIPE_ACCESS_DUPLEX | _winapi.FILE_FLAG_OVERLAPPED
            if self._first:
                open_mode |= _winapi.FILE_FLAG_FIRST_PIPE_INSTANCE
            handle = _winapi.CreateNamedPipe(
                self.name,
                open_mode,
                _PIPE_TYPE_BYTE | _PIPE_READMODE_BYTE | _winapi.PIPE_WAIT
                | _PIPE_REJECT_REMOTE_CLIENTS,
                _winapi.PIPE_UNLIMITED_INSTANCES,
                _BUFSIZE,
                _BUFSIZE,
                0,
                ctypes.addressof(self._attributes),
            )  # fmt: skip
            self._first = False
            return windows_utils.PipeHandle(handle)

        async def start(self) -> None:
            # The first instance now, so that "another daemon has the name" fails start-up.
            first = self._new_instance()
            self._task = asyncio.create_task(self._serve(first))

        async def _serve(self, pipe: windows_utils.PipeHandle) -> None:
            loop = asyncio.get_running_loop()
            # The IOCP proactor of asyncio's ProactorEventLoop (the default loop on Windows).
            proactor: Any = loop._proactor  # type: ignore[attr-defined]
            while True:
                try:
                    await proactor.accept_pipe(pipe)
                except BaseException:
                    pipe.close()
                    raise
                reader = asyncio.StreamReader()
                protocol = asyncio.StreamReaderProtocol(reader, self.handler)
                loop._make_duplex_pipe_transport(pipe, protocol)  # type: ignore[attr-defined]
                pipe = self._new_instance()

        def close(self) -> None:
            if self._task is not None:
                self._task.cancel()
