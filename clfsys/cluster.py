"""Connecting to Ray: the cluster in RAY_ADDRESS, or a local instance started on demand."""

from __future__ import annotations

import os
import socket

from clfsys.errors import ClfsysError, first_line

# Ray itself retries an unreachable address for minutes before it gives up.
REACH_TIMEOUT_S = 10.0


def init_ray(metrics_export_port: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local Ray instance (whose metrics
    agent serves Prometheus text on `metrics_export_port`, if given).

    A RAY_ADDRESS that nothing answers at, or whose cluster refuses the driver, is a user
    error naming the variable."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address:
        ray.init(include_dashboard=False, log_to_driver=True,
                 _metrics_export_port=metrics_export_port)
        return
    check_reachable(address)
    try:
        ray.init(log_to_driver=True)
    except ConnectionError as exc:
        raise ClfsysError(f"RAY_ADDRESS={address}: could not join the Ray cluster there "
                          f"({first_line(exc)}); unset RAY_ADDRESS to start a local Ray "
                          "instance instead") from exc


def check_reachable(address: str) -> None:
    """Fail in seconds, naming RAY_ADDRESS, when nothing accepts a TCP connection at its
    host:port. `auto` and `local` are Ray's own words and are left to Ray."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClfsysError(f"RAY_ADDRESS={address}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        raise ClfsysError(f"RAY_ADDRESS={address}: nothing answers at {host}:{port} "
                          f"({first_line(exc)}); is the cluster's head up?") from None
