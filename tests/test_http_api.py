"""The HTTP surface without Ray: clfsys.http on a real uvicorn server on 127.0.0.1, with a
Predictor in-process (DirectBackend), driven by real clients: requests, and the Open Inference
Protocol's own client (tritonclient)."""

import base64
import io
import threading
import time

import numpy as np
import pytest
import requests
from conftest import pattern_image
from PIL import Image
from test_label import huge_png_header

from clfsys.ingress import free_port

TOKEN = "correct horse battery staple"


def png_bytes(label: int, seed: int, size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern_image(label, size, np.random.default_rng(seed))).save(buffer, "PNG")
    return buffer.getvalue()


class Uvicorn:
    """A uvicorn server in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def predictor(trained_bundle):
    from clfsys.predict import Predictor

    return Predictor(trained_bundle)


@pytest.fixture(scope="module")
def api(predictor):
    from clfsys.http import DirectBackend, Limits, build_api, token_digest

    limits = Limits(max_body_bytes=1024 * 1024)
    open_server = Uvicorn(build_api(DirectBackend(predictor), limits))
    secure = Uvicorn(build_api(DirectBackend(predictor, name="secure"), limits,
                               token_sha256=token_digest(TOKEN)))
    yield open_server.url, secure.url
    open_server.stop()
    secure.stop()


def test_the_three_protocols_agree_with_the_predictor(api, predictor):
    import tritonclient.http as triton

    url, _ = api
    blobs = [png_bytes(i % 3, 40 + i) for i in range(4)]
    rows = predictor.rows(np.stack([predictor.decode(b) for b in blobs]))
    own = [requests.post(f"{url}/predict", data=b, headers={"Content-Type": "image/png"},
                         timeout=30).json() for b in blobs]
    tf = requests.post(f"{url}/v1/models/clfsys:predict", timeout=30, json={
        "instances": [{"b64": base64.b64encode(b).decode()} for b in blobs]}).json()
    v2_json = requests.post(f"{url}/v2/models/clfsys/infer", timeout=30, json={"inputs": [{
        "name": "image", "datatype": "BYTES", "shape": [4],
        "data": [base64.b64encode(b).decode() for b in blobs]}]}).json()
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    encoded = triton.InferInput("image", [4], "BYTES")
    encoded.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=True)
    v2_bytes = client.infer("clfsys", [encoded])
    pixels = triton.InferInput("pixels", [4, *predictor.bundle.input_shape], "UINT8")
    pixels.set_data_from_numpy(np.stack([predictor.decode(b) for b in blobs]),
                               binary_data=False)
    v2_pixels = client.infer("clfsys", [pixels])

    expected_index = [r["label_index"] for r in rows]
    assert [o["label_index"] for o in own] == expected_index
    assert [p["label_index"] for p in tf["predictions"]] == expected_index
    outputs = {o["name"]: o for o in v2_json["outputs"]}
    assert outputs["label_index"]["data"] == expected_index
    assert outputs["probabilities"]["shape"] == [4, 3]
    for result in (v2_bytes, v2_pixels):
        assert result.as_numpy("label_index").tolist() == expected_index
        labels = [x.decode() if isinstance(x, bytes) else x for x in result.as_numpy("label")]
        assert labels == [r["label"] for r in rows]
        assert np.allclose(result.as_numpy("probabilities"),
                           [r["probabilities"] for r in rows], atol=1e-6)
    assert own[0]["confidence"] == pytest.approx(rows[0]["confidence"], abs=1e-6)
    assert own[0]["model_id"] == predictor.model_id
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("clfsys") and not client.is_model_ready("other")
    meta = client.get_model_metadata("clfsys")
    assert meta["name"] == "clfsys" and meta["versions"] == [predictor.model_id]
    assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "UINT8"}
    status = requests.get(f"{url}/v1/models/clfsys", timeout=30).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    signature = requests.get(f"{url}/v1/models/clfsys/metadata", timeout=30).json()
    assert "image" in signature["metadata"]["signature_def"]["signature_def"][
        "serving_default"]["inputs"]


def test_tf_serving_takes_pixel_arrays_and_named_inputs(api, predictor):
    url, _ = api
    blob = png_bytes(1, 3)
    pixels = predictor.decode(blob)
    expected = predictor.rows(pixels[None])[0]["label_index"]
    body = {"instances": [pixels.tolist(), {"image": {"b64": base64.b64encode(blob).decode()}}]}
    response = requests.post(f"{url}/v1/models/clfsys:predict", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert [p["label_index"] for p in response.json()["predictions"]] == [expected] * 2


def test_bad_input_gets_the_protocols_4xx_never_a_500(api):
    url, _ = api
    good = png_bytes(0, 1)
    b64 = base64.b64encode(good).decode()
    image = {"Content-Type": "image/png"}
    v2 = f"{url}/v2/models/clfsys/infer"
    tf = f"{url}/v1/models/clfsys:predict"
    cases = [
        ("empty body", f"{url}/predict", dict(data=b"", headers=image), 400),
        ("not an image", f"{url}/predict", dict(data=b"nope" * 40, headers=image), 422),
        ("content type", f"{url}/predict", dict(data=good, headers={"Content-Type":
                                                                     "text/plain"}), 415),
        ("truncated", f"{url}/predict", dict(data=good[: len(good) // 2], headers=image), 422),
        ("too large", f"{url}/predict", dict(data=b"\0" * (2 * 1024 * 1024), headers=image),
         413),
        ("too many pixels", f"{url}/predict", dict(data=huge_png_header(50_000, 50_000),
                                                   headers=image), 422),
        ("malformed multipart", f"{url}/predict", dict(data=b"--x\r\ngarbage", headers={
            "Content-Type": "multipart/form-data; boundary=xyz"}), 400),
        ("multipart without file", f"{url}/predict", dict(files={"other": ("a", good)}), 400),
        ("batch not multipart", f"{url}/predict/batch", dict(data=good, headers=image), 415),
        ("v2 not json", v2, dict(data=b"{nope"), 400),
        ("v2 no inputs", v2, dict(json={"inputs": []}), 400),
        ("v2 bad datatype", v2, dict(json={"inputs": [{"name": "x", "datatype": "FP32",
                                                       "shape": [1], "data": [1.0]}]}), 400),
        ("v2 bad base64", v2, dict(json={"inputs": [{"name": "image", "datatype": "BYTES",
                                                     "shape": [1], "data": ["%%%"]}]}), 400),
        ("v2 shape mismatch", v2, dict(json={"inputs": [{"name": "image", "datatype": "BYTES",
                                                         "shape": [2], "data": [b64]}]}), 400),
        ("v2 wrong pixel shape", v2, dict(json={"inputs": [{
            "name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}]}),
         400),
        ("v2 pixel out of range", v2, dict(json={"inputs": [{
            "name": "pixels", "datatype": "UINT8", "shape": [1, 20, 20, 3],
            "data": [300] * 1200}]}), 400),
        ("v2 not an image", v2, dict(json={"inputs": [{
            "name": "image", "datatype": "BYTES", "shape": [1],
            "data": [base64.b64encode(b"text").decode()]}]}), 422),
        ("v2 unknown output", v2, dict(json={"inputs": [{
            "name": "image", "datatype": "BYTES", "shape": [1], "data": [b64]}],
            "outputs": [{"name": "logits"}]}), 400),
        ("v2 binary header too long", v2, dict(data=b"{}", headers={
            "Inference-Header-Content-Length": "99"}), 400),
        ("v2 unknown model", f"{url}/v2/models/other/infer", dict(json={}), 404),
        ("tf not json", tf, dict(data=b"[1, 2"), 400),
        ("tf no instances", tf, dict(json={"instances": []}), 400),
        ("tf bad instance", tf, dict(json={"instances": [{"png": b64}]}), 400),
        ("tf bad base64", tf, dict(json={"instances": [{"b64": "***"}]}), 400),
        ("tf not an image", tf, dict(json={"instances": [{"b64": "dGV4dA=="}]}), 422),
        ("tf wrong pixels", tf, dict(json={"instances": [[[1, 2, 3]]]}), 400),
        ("tf unknown model", f"{url}/v1/models/other:predict", dict(json={}), 404),
    ]
    for name, target, kwargs, status in cases:
        response = requests.post(target, timeout=30, **kwargs)
        assert response.status_code == status, (name, response.text)
        assert isinstance(response.json()["error"], str) and response.json()["error"], name
    assert requests.post(f"{url}/predict", data=good, headers=image,
                         timeout=30).status_code == 200  # still serving


def test_unknown_routes_and_methods_answer_in_the_error_shape(api):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    url, _ = api
    for method, path, status in [("GET", "/nowhere", 404), ("POST", "/v2/repository/index", 404),
                                 ("GET", "/predict", 405)]:
        response = requests.request(method, f"{url}{path}", timeout=30)
        assert response.status_code == status and list(response.json()) == ["error"], path
        assert response.json()["error"].startswith(f"{method} {path}: "), response.text
    # The Open Inference Protocol's own client reads "error": it names what went wrong.
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    with pytest.raises(InferenceServerException, match="/v2/repository/index: Not Found"):
        client.get_model_repository_index()


def test_auth_covers_models_and_docs_but_not_health(api):
    _, url = api
    good = png_bytes(2, 9)
    right = {"Authorization": f"Bearer {TOKEN}"}
    protected = [("POST", "/predict", dict(data=good, headers={"Content-Type": "image/png"})),
                 ("GET", "/metadata", {}), ("GET", "/docs", {}), ("GET", "/openapi.json", {}),
                 ("GET", "/v2/models/secure", {}),
                 ("POST", "/v2/models/secure/infer", dict(json={"inputs": [{
                     "name": "image", "datatype": "BYTES", "shape": [1],
                     "data": [base64.b64encode(good).decode()]}]})),
                 ("GET", "/v1/models/secure/metadata", {}),
                 ("POST", "/v1/models/secure:predict", dict(json={"instances": [{
                     "b64": base64.b64encode(good).decode()}]}))]
    for method, path, kwargs in protected:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            extra = {**kwargs.get("headers", {}), **headers}
            response = requests.request(method, url + path, timeout=30,
                                        **{**kwargs, "headers": extra})
            assert response.status_code == 401, (path, headers, response.text)
            assert "token" in response.json()["error"]
        extra = {**kwargs.get("headers", {}), **right}
        response = requests.request(method, url + path, timeout=30,
                                    **{**kwargs, "headers": extra})
        assert response.status_code == 200, (path, response.text)
    for path in ("/healthz", "/v2/health/live", "/v2/health/ready", "/v2/models/secure/ready",
                 "/v1/models/secure"):
        assert requests.get(url + path, timeout=30).status_code == 200, path
    schema = requests.get(f"{url}/openapi.json", headers=right, timeout=30).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_openapi_documents_bodies_and_errors(api):
    url, _ = api
    schema = requests.get(f"{url}/openapi.json", timeout=30).json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {
        "image/*", "application/octet-stream", "multipart/form-data"}
    assert {"400", "413", "415", "422"} <= set(predict["responses"])
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            for code, response in operation["responses"].items():
                if code.startswith("4"):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/Error"), (path, method, code)
                elif code == "200":
                    assert response["content"]["application/json"]["schema"], (path, method)
    infer = schema["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]
    ref = infer["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "inputs" in schema["components"]["schemas"][ref]["properties"]


def test_haproxy_listeners_on_all_interfaces_move_to_loopback():
    from clfsys.ingress import loopback_config

    config = ("frontend prometheus\n    bind :9101\n    mode http\nfrontend http_frontend\n"
              "    bind 127.0.0.1:8000\nlisten stats\n  bind *:8404\n  bind 0.0.0.0:8405\n"
              "backend b\n    server s1 10.0.0.5:30000 check\n")
    out = loopback_config(config)
    assert "bind 127.0.0.1:9101" in out and "bind 127.0.0.1:8404" in out
    assert "bind 127.0.0.1:8405" in out and "bind 127.0.0.1:8000" in out
    assert "server s1 10.0.0.5:30000 check" in out  # backends untouched


def test_the_root_app_routes_standard_protocols_to_other_models_by_name(predictor):
    """NameRouter in front of the root model hands /v2 and /v1 requests for another name to
    that model's app (here in-process, as the Serve replica does over a handle): the other
    model's own auth applies, and a name nobody serves is the root model's 404."""
    import tritonclient.http as triton

    from clfsys import http as h

    limits = h.Limits(max_body_bytes=1024 * 1024)
    secure = h.build_api(h.DirectBackend(predictor, name="secure"), limits,
                         token_sha256=h.token_digest(TOKEN))
    asked = []

    async def forward(name, request):
        asked.append(name)
        return await h.call_asgi(secure, request) if name == "secure" else None

    server = Uvicorn(h.NameRouter(h.build_api(h.DirectBackend(predictor), limits), "clfsys",
                                  forward, limits))
    try:
        blobs = [png_bytes(i % 3, 70 + i) for i in range(3)]
        expected = [r["label_index"] for r in predictor.rows(
            np.stack([predictor.decode(b) for b in blobs]))]
        auth = {"Authorization": f"Bearer {TOKEN}"}
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        assert client.is_server_ready() and client.is_model_ready("secure")
        tensor = triton.InferInput("image", [3], "BYTES")
        tensor.set_data_from_numpy(np.array(blobs, dtype=np.object_))
        result = client.infer("secure", [tensor], headers=dict(auth))
        assert result.as_numpy("label_index").tolist() == expected
        assert client.get_model_metadata("secure", headers=dict(auth))["name"] == "secure"
        body = {"instances": [{"b64": base64.b64encode(b).decode()} for b in blobs]}
        refused = requests.post(f"{server.url}/v1/models/secure:predict", json=body, timeout=30)
        assert refused.status_code == 401 and "token" in refused.json()["error"]
        tf = requests.post(f"{server.url}/v1/models/secure:predict", json=body, headers=auth,
                           timeout=30)
        assert [p["label_index"] for p in tf.json()["predictions"]] == expected
        missing = requests.post(f"{server.url}/v2/models/nobody/infer", json={}, timeout=30)
        assert missing.status_code == 404 and "'nobody'" in missing.json()["error"]
        assert requests.post(f"{server.url}/v1/models/clfsys:predict", json=body,
                             timeout=30).status_code == 200
        assert "clfsys" not in asked and "nobody" in asked
        too_big = requests.post(f"{server.url}/v2/models/secure/infer", data=b"x" * (2 << 20),
                                headers={"Content-Type": "application/json"}, timeout=30)
        assert too_big.status_code == 413
    finally:
        server.stop()
