"""Online endpoint: a Ray Serve deployment with a FastAPI ingress around the Predictor.

Requests are batched adaptively with `@serve.batch`; each batch is padded to the maximum batch
size so the model always sees one shape. Bodies are read with a size limit, decoded with the
one decode path, and every bad input is answered with a 4xx and JSON `{"error": ...}`.

`clfsys serve` runs it until Ctrl-C or SIGTERM, then deletes only its own application;
`app_builder` is the import path for `serve run` / `serve deploy` (see jobs/serve.yaml). The bundle
reaches replicas on any node as a `bundle.Portable`: its URI, or the files of a local bundle.
"""


import asyncio
import hashlib
import hmac
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from clfsys.errors import ClfsysError

APP_NAME = "clfsys"
IMAGE_ERROR_STATUS = {"empty file": 400, "not an image": 422, "truncated": 422,
                      "too many pixels": 422}


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    max_replicas_per_node: int | None = None
    """Spread replicas: at most this many on one node."""
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    num_gpus: float = 0.0
    max_body_mb: float = 10.0
    top_k: int = 3
    request_timeout_s: float = 30.0
    auth_token_env: str | None = None
    name: str = APP_NAME
    """The Serve application's name; other names are routed under /<name>."""

    @property
    def route_prefix(self) -> str:
        return "/" if self.name == APP_NAME else f"/{self.name}"

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.name):
            raise ClfsysError(f"--name must be letters, digits, '_', '.' or '-', got "
                              f"{self.name!r}")
        rules = [("--port", 0 < self.port < 65536), ("--replicas", self.replicas >= 1),
                 ("--max-batch-size", self.max_batch_size >= 1),
                 ("--batch-wait-ms", self.batch_wait_ms >= 0),
                 ("--num-gpus", self.num_gpus >= 0), ("--max-body-mb", self.max_body_mb > 0),
                 ("--top-k", self.top_k >= 1),
                 ("--max-replicas-per-node", self.max_replicas_per_node is None
                  or self.max_replicas_per_node >= 1)]
        if self.min_replicas is not None or self.max_replicas is not None:
            rules.append(("--min-replicas", self.min_replicas is not None
                          and self.min_replicas >= 0))
            rules.append(("--max-replicas", self.max_replicas is not None
                          and self.max_replicas >= max(1, self.min_replicas or 0)))
        for flag, ok in rules:
            if not ok:
                value = getattr(self, flag.lstrip("-").replace("-", "_"))
                raise ClfsysError(f"{flag} has a bad value: {value!r}")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_auth_token(env_var: str | None) -> str | None:
    """The bearer token from `env_var`, or None when auth is off."""
    if not env_var:
        return None
    token = os.environ.get(env_var, "")
    if not token:
        raise ClfsysError(f"--auth-token-env {env_var}: the environment variable is not set "
                          "or empty")
    return token


def _make_deployment(options: ServeOptions, token_sha256: str | None):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    from clfsys import images

    api = FastAPI(title="clfsys", description="Image classification with a clfsys model "
                  "bundle. POST an image to /predict.")
    max_body = int(options.max_body_mb * 1024 * 1024)

    class BadRequest(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @api.exception_handler(BadRequest)
    async def _bad_request(_request, exc: BadRequest):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def _check_auth(request: Request) -> None:
        if token_sha256 is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token_digest(presented.strip()), token_sha256):
            raise BadRequest(401, "missing or invalid bearer token")

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise BadRequest(413, f"body of {int(declared):,} bytes exceeds the "
                                  f"{max_body:,}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise BadRequest(413, f"body exceeds the {max_body:,}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _files(request: Request, body: bytes) -> list[tuple[str, bytes]]:
        """(field name, bytes) of each uploaded part, in order."""
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=256,
                                         max_fields=256).parse()
        except (MultiPartException, ValueError, KeyError) as exc:
            raise BadRequest(400, f"malformed multipart body: {exc}") from None
        files = []
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((name, await value.read()))
        return files

    async def _images_from(request: Request, batch: bool) -> list[bytes]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _read_body(request)
        if content_type.startswith("multipart/form-data"):
            if not body:
                raise BadRequest(400, "empty body")
            files = await _files(request, body)
            if not batch:
                files = [f for f in files if f[0] == "file"]
                if not files:
                    raise BadRequest(400, "multipart body has no 'file' field")
                files = files[:1]
            if not files:
                raise BadRequest(400, "multipart body has no files")
            return [data for _, data in files]
        if batch:
            raise BadRequest(415, f"/predict/batch takes multipart/form-data, got "
                                  f"{content_type or 'no content type'!r}")
        if not (content_type.startswith("image/") or content_type == "application/octet-stream"):
            raise BadRequest(415, f"unsupported content type {content_type or '(none)'!r}; "
                                  "send image/* or application/octet-stream, or multipart "
                                  "with a 'file' field")
        if not body:
            raise BadRequest(400, "empty body")
        return [body]

    @serve.deployment(name="Classifier", graceful_shutdown_timeout_s=20,
                      health_check_period_s=2, health_check_timeout_s=10)
    @serve.ingress(api)
    class Classifier:
        def __init__(self, source):
            import ray

            from clfsys.predict import Predictor

            self.predictor = Predictor(source.open(), top_k=options.top_k)
            self.node_id = ray.get_runtime_context().get_node_id()
            self.shape = self.predictor.bundle.input_shape
            self.max_batch = options.max_batch_size
            self._predict.set_max_batch_size(options.max_batch_size)
            self._predict.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)
            # Warm-up: build the graph for the one padded shape before reporting ready.
            self.predictor.predict(np.zeros((self.max_batch, *self.shape), dtype=np.uint8))

        def check_health(self) -> None:  # Serve calls this; raising marks the replica dead
            if self.predictor is None:
                raise RuntimeError("model not loaded")

        def _run(self, batch: np.ndarray) -> list[dict[str, Any]]:
            n = len(batch)
            padded = np.zeros((self.max_batch, *self.shape), dtype=np.uint8)
            padded[:n] = batch
            result = self.predictor.predict(padded)
            return [{"label": str(result["label"][i]),
                     "label_index": int(result["label_index"][i]),
                     "confidence": float(result["confidence"][i]),
                     "top_k": self.predictor.top_k_records(result, i),
                     "model_id": self.predictor.model_id} for i in range(n)]

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def _predict(self, arrays: list[np.ndarray]) -> list[dict[str, Any]]:
            return await asyncio.to_thread(self._run, np.stack(arrays))

        def _decode(self, data: bytes) -> np.ndarray:
            try:
                return self.predictor.decode(data)
            except images.ImageError as exc:
                raise BadRequest(IMAGE_ERROR_STATUS.get(exc.kind, 422), str(exc)) from None

        @api.post("/predict", summary="Label one image (raw body or multipart field 'file')")
        async def predict(self, request: Request) -> dict[str, Any]:
            _check_auth(request)
            (data,) = await _images_from(request, batch=False)
            return await self._predict(self._decode(data))

        @api.post("/predict/batch", summary="Label several images (multipart), in order")
        async def predict_batch(self, request: Request) -> list[dict[str, Any]]:
            _check_auth(request)
            arrays = [self._decode(data) for data in await _images_from(request, batch=True)]
            return list(await asyncio.gather(*(self._predict(a) for a in arrays)))

        @api.get("/metadata", summary="Classes, input, model_id and test metrics")
        async def metadata(self, request: Request) -> dict[str, Any]:
            _check_auth(request)
            meta = self.predictor.bundle.metadata
            metrics = meta.get("metrics", {})
            return {"classes": meta["class_names"], "input_shape": meta["input_shape"],
                    "color_mode": meta["color_mode"], "model_id": meta["model_id"],
                    "test_metrics": {"accuracy": metrics.get("test_accuracy"),
                                     "loss": metrics.get("test_loss")},
                    "max_batch_size": self.max_batch}

        @api.get("/healthz", summary="200 once the model is loaded and warmed up")
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok", "model_id": self.predictor.model_id, "node_id": self.node_id}

    return Classifier


def build_app(model: str | Path, options: ServeOptions | None = None,
              token: str | None = None):
    """The Serve application for a bundle at a local path or URI (not started)."""
    from clfsys import bundle

    options = options or ServeOptions()
    options.check()
    found = bundle.load(model)
    found.load_model()  # fail fast, in the caller, on a bad bundle
    deployment = _make_deployment(options, token_digest(token) if token else None)
    config: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1, "num_gpus": options.num_gpus},
        "max_ongoing_requests": max(64, 4 * options.max_batch_size),
    }
    if options.max_replicas_per_node:
        config["max_replicas_per_node"] = options.max_replicas_per_node
    if options.min_replicas is not None or options.max_replicas is not None:
        config["autoscaling_config"] = {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests}
    else:
        config["num_replicas"] = options.replicas
    return deployment.options(**config).bind(bundle.portable(found))


def app_builder(args: dict[str, Any]):
    """Import path for `serve run clfsys.serve:app_builder model=DIR` and Serve config files.

    `args`: model (required) and any ServeOptions field; auth_token_env names an environment
    variable of the replicas' runtime environment that holds the bearer token.
    """
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ClfsysError("app_builder needs args.model: the bundle's URI or directory")
    fields = ServeOptions.__dataclass_fields__
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ClfsysError(f"unknown serve option {unknown[0]!r} (known: {', '.join(fields)})")
    # `serve run ... key=value` passes strings; config files pass typed YAML values.
    options = ServeOptions(**{k: yaml.safe_load(v) if isinstance(v, str) and k not in (
        "host", "auth_token_env", "name") else v for k, v in args.items()})
    return build_app(model, options, token=read_auth_token(options.auth_token_env))


def run_server(model: str, options: ServeOptions) -> dict[str, Any]:
    """`clfsys serve`: deploy the application and block until Ctrl-C or SIGTERM; then delete
    this application only (other applications on the cluster keep running)."""
    from ray import serve

    from clfsys.cluster import init_ray

    token = read_auth_token(options.auth_token_env)
    app = build_app(model, options, token=token)
    init_ray()
    started = time.monotonic()
    url = f"http://{options.host}:{options.port}{options.route_prefix.rstrip('/')}"

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)  # systemd, Kubernetes, docker stop
    deployed = False
    try:
        serve.start(http_options={"host": options.host, "port": options.port,
                                  "request_timeout_s": options.request_timeout_s})
        serve.run(app, name=options.name, route_prefix=options.route_prefix)
        deployed = True
        print(f"serving {model} as application {options.name!r} at {url} (POST "
              f"{url}/predict, docs at {url}/docs; auth {'on' if token else 'off'}); Ctrl-C to "
              "stop", file=sys.stderr, flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print(f"shutting down application {options.name!r}: finishing in-flight requests",
              file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the drain
        try:
            serve.delete(options.name)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return {"served_s": round(time.monotonic() - started, 1), "url": url,
            "application": options.name, "deployed": deployed, "options": asdict(options)}
