"""The running daemon: what each op does, the composition root that wires the layers below,
and the service manager's contract (readiness, status, watchdog, exit-on-idle)."""
