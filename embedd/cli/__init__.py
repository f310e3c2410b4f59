"""The `embedd` command and the tools that run outside the daemon (bench, index and search,
pull, service install): clients of the daemon, never imported by it."""
