"""Moving bytes: the asyncio shell around msgpack conversations on a Unix socket (a named pipe
on Windows), socket files, peer credentials, and sockets passed by systemd or launchd."""
