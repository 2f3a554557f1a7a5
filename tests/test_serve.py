"""The endpoint on a real Ray Serve HTTP server on 127.0.0.1, driven by real HTTP clients."""

import asyncio
import io
import os
import signal
import time

import numpy as np
import pytest
import requests
from conftest import free_port, pattern_image
from PIL import Image
from test_label import huge_png_header

from clfsys.predict import Predictor
from clfsys.serve import ServeOptions, build_app

pytestmark = pytest.mark.slow
TOKEN = "correct horse battery staple"


@pytest.fixture(scope="module")
def server(trained_bundle):
    import ray
    from ray import serve

    from clfsys.cluster import init_ray

    port = free_port()
    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 30})
    options = ServeOptions(max_batch_size=8, batch_wait_ms=10)
    serve.run(build_app(trained_bundle, options), name="open", route_prefix="/")
    serve.run(build_app(trained_bundle, options, token=TOKEN), name="secure",
              route_prefix="/secure")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def png_bytes(label: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern_image(label, 20, np.random.default_rng(seed))).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def predictor(trained_bundle):
    return Predictor(trained_bundle)


def test_predictions_equal_the_predictors_on_the_same_bytes(server, predictor):
    for seed in range(6):
        data = png_bytes(seed % 3, seed)
        expected = predictor.predict(predictor.decode(data)[None])
        raw = requests.post(f"{server}/predict", data=data,
                            headers={"Content-Type": "image/png"}, timeout=30)
        form = requests.post(f"{server}/predict", files={"file": ("x.png", data)}, timeout=30)
        for response in (raw, form):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["label_index"] == expected["label_index"][0]
            assert body["label"] == expected["label"][0]
            assert body["confidence"] == pytest.approx(expected["confidence"][0], abs=1e-6)
            assert body["model_id"] == predictor.model_id
            assert [t["label"] for t in body["top_k"]][0] == body["label"]


def test_batch_endpoint_keeps_order(server):
    blobs = [png_bytes(i % 3, 100 + i) for i in range(7)]
    singles = [requests.post(f"{server}/predict", data=b,
                             headers={"Content-Type": "application/octet-stream"},
                             timeout=30).json() for b in blobs]
    files = [("files", (f"{i}.png", b)) for i, b in enumerate(blobs)]
    batch = requests.post(f"{server}/predict/batch", files=files, timeout=30)
    assert batch.status_code == 200, batch.text
    assert [r["label_index"] for r in batch.json()] == [s["label_index"] for s in singles]
    assert [round(r["confidence"], 6) for r in batch.json()] == [
        round(s["confidence"], 6) for s in singles]


def test_metadata(server, trained_bundle, predictor):
    body = requests.get(f"{server}/metadata", timeout=30).json()
    meta = predictor.bundle.metadata
    assert body["classes"] == meta["class_names"] == ["left", "right", "top"]
    assert body["input_shape"] == [20, 20, 3] and body["color_mode"] == "rgb"
    assert body["model_id"] == meta["model_id"]
    assert body["test_metrics"]["accuracy"] == meta["metrics"]["test_accuracy"]
    assert requests.get(f"{server}/healthz", timeout=30).status_code == 200
    assert "/predict" in requests.get(f"{server}/openapi.json", timeout=30).json()["paths"]


def test_bad_inputs_get_a_4xx_with_a_json_error(server):
    good = png_bytes(0, 1)
    image = {"Content-Type": "image/png"}
    cases = [
        ("empty body", dict(data=b"", headers=image), 400),
        ("not an image", dict(data=b"definitely not pixels" * 10, headers=image), 422),
        ("unsupported content type", dict(data=good, headers={"Content-Type": "text/plain"}),
         415),
        ("truncated", dict(data=good[: len(good) // 2], headers=image), 422),
        ("too large", dict(data=b"\0" * (11 * 1024 * 1024), headers=image), 413),
        ("too many pixels", dict(data=huge_png_header(50_000, 50_000), headers=image), 422),
        ("malformed multipart", dict(data=b"--nope\r\ngarbage", headers={
            "Content-Type": "multipart/form-data; boundary=xyz"}), 400),
        ("multipart without file", dict(files={"other": ("a.png", good)}), 400),
    ]
    for name, kwargs, status in cases:
        response = requests.post(f"{server}/predict", timeout=30, **kwargs)
        assert response.status_code == status, (name, response.text)
        assert isinstance(response.json()["error"], str) and response.json()["error"], name
    bad_batch = requests.post(f"{server}/predict/batch", data=good, headers=image, timeout=30)
    assert bad_batch.status_code == 415
    assert requests.post(f"{server}/predict", data=good, headers=image,
                         timeout=30).status_code == 200  # still serving


def test_bearer_token_auth(server):
    data = png_bytes(1, 7)
    image = {"Content-Type": "image/png"}
    assert requests.post(f"{server}/secure/predict", data=data, headers=image,
                         timeout=30).status_code == 401
    wrong = {**image, "Authorization": "Bearer nope"}
    response = requests.post(f"{server}/secure/predict", data=data, headers=wrong, timeout=30)
    assert response.status_code == 401 and "token" in response.json()["error"]
    right = {**image, "Authorization": f"Bearer {TOKEN}"}
    assert requests.post(f"{server}/secure/predict", data=data, headers=right,
                         timeout=30).status_code == 200
    assert requests.get(f"{server}/secure/metadata", timeout=30).status_code == 401
    assert requests.get(f"{server}/secure/healthz", timeout=30).status_code == 200
    assert requests.post(f"{server}/predict", data=data, headers=image,
                         timeout=30).status_code == 200  # auth off on the other app


def test_200_concurrent_requests_all_succeed(server):
    import aiohttp

    blobs = [png_bytes(i % 3, 1000 + i) for i in range(10)]

    async def main():
        async with aiohttp.ClientSession() as session:
            async def one(i):
                async with session.post(f"{server}/predict", data=blobs[i % 10],
                                        headers={"Content-Type": "image/png"}) as response:
                    await response.json()
                    return response.status

            return await asyncio.gather(*(one(i) for i in range(200)))

    assert asyncio.run(main()) == [200] * 200


def test_a_killed_replica_is_replaced(server):
    from pathlib import Path

    def replica_pids():  # Ray titles a replica's process ray::ServeReplica:<app>:<deployment>
        pids = set()
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(
                        b"ray::ServeReplica:open:"):
                    pids.add(int(proc.name))
            except OSError:
                continue
        return pids

    (old,) = replica_pids()
    os.kill(old, signal.SIGKILL)
    data = png_bytes(2, 3)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            response = requests.post(f"{server}/predict", data=data,
                                     headers={"Content-Type": "image/png"}, timeout=10)
            if response.status_code == 200 and replica_pids() - {old}:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    assert replica_pids() and old not in replica_pids()
    assert requests.post(f"{server}/predict", data=data, headers={"Content-Type": "image/png"},
                         timeout=30).status_code == 200


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
    with pytest.raises(ClfsysError, match="--max-replicas has a bad value"):
        app_builder({"model": str(trained_bundle), "min_replicas": 3, "max_replicas": 2})
    from conftest import ROOT

    config = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    ServeDeploySchema(**config)
    assert config["applications"][0]["import_path"] == "clfsys.serve:app_builder"
