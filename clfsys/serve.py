"""Online endpoint: a Ray Serve deployment (`ModelServer`) whose HTTP routes come from
clfsys.http, in front of Serve's HAProxy ingress or its Python proxy (clfsys.ingress).

Each replica hosts one Predictor. Requests are batched by clfsys.batcher: a batch forms when
the model is free and waits only for requests already being decoded; batches of any size go
through the Predictor's one fixed-signature function, so nothing retraces and no
batch is padded (padding made every lone request cost a full batch). Images over 16 KiB are
decoded in a thread pool, off the replica's event loop; smaller ones decode faster than the
hop to a thread. Metrics go to Ray's metrics agent, which every
node exposes in Prometheus text format (`ray_clfsys_*`).

The `clfsys serve` command (run, drain, swap) is serve_run.py. `app_builder` is the import
path for `serve run` / `serve deploy` (see jobs/serve.yaml). The bundle reaches replicas on any
node as a `bundle.Portable`: its URI, or the files of a local bundle.
"""


import asyncio
import json
import logging
import math
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clfsys.errors import ClfsysError
from clfsys.options import from_values, option

APP_NAME = "clfsys"
DEPLOYMENT = "Classifier"
def replica_env(num_cpus: float = 1.0) -> dict[str, str]:
    """The environment of a replica that holds `num_cpus` CPUs. Serve: requests run on the
    replica's own event loop instead of hopping to a second loop in another thread (the model
    itself runs in a worker thread). TensorFlow: as many compute threads as the replica holds
    CPUs, rounded up (by default TF's pools take every core of the node, and their threads
    compete with the event loop)."""
    return {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
            "TF_NUM_INTRAOP_THREADS": str(max(1, math.ceil(num_cpus))),
            "TF_NUM_INTEROP_THREADS": "1"}


HANDLE_TTL_S = 5.0
"""How long the root application trusts its handle to another model's application."""
INLINE_DECODE_BYTES = 16 * 1024
"""Bodies up to this size are decoded on the event loop; larger ones in the decode threads."""


@dataclass(frozen=True)
class ServeOptions:
    """Every `clfsys serve` flag (--max-batch-size is max_batch_size) with its default."""

    name: str = option(APP_NAME, "the model's name: the Serve application; names other than the "
                     "default are served under /<name>/ (several models on one cluster)")
    host: str = option("127.0.0.1", "address to bind")
    port: int = option(8000, "HTTP port")
    ingress: str = option("auto", "auto (HAProxy where there is a binary, else Serve's proxy), "
                        "haproxy or proxy; for the local Ray instance this command starts")
    metrics_port: int = option(8080, "Prometheus metrics of the local Ray instance this command "
                             "starts, at http://HOST:PORT/metrics")
    replicas: int = option(1, "fixed number of replicas")
    min_replicas: int | None = option(None, "autoscaling lower bound")
    max_replicas: int | None = option(None, "autoscaling upper bound")
    target_ongoing_requests: float = option(16.0, "autoscaling target per replica")
    max_replicas_per_node: int | None = option(None, "spread replicas: at most this many on one "
                                             "node")
    max_batch_size: int = option(32, "largest batch a replica runs")
    batch_wait_ms: float = option(5.0, "longest a batch waits for requests already on their "
                                "way (a lone request does not wait)")
    decode_threads: int = option(2, "threads per replica decoding images over 16 KiB off the "
                               "event loop (0: decode every image on the event loop)")
    num_cpus: float = option(1.0, "CPUs each replica reserves; TensorFlow computes with as "
                           "many threads (rounded up)")
    num_gpus: float = option(0.0, "GPUs per replica")
    max_body_mb: float = option(10.0, "largest request body")
    top_k: int = option(3, "classes in each answer's top_k")
    request_timeout_s: float = option(30.0, "end-to-end timeout of a request")
    auth_token_env: str | None = option(None, "require 'Authorization: Bearer <token>', the token "
                                      "read from this environment variable")
    access_log: bool = option(False, "write Serve's access log line per request to the replicas' "
                            "log files (request counts and latency are in the metrics anyway)")

    @property
    def route_prefix(self) -> str:
        return "/" if self.name == APP_NAME else f"/{self.name}"

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", self.name):
            raise ClfsysError(f"--name must be letters, digits, '_', '.' or '-', got "
                              f"{self.name!r}")
        rules = [("--port", 0 < self.port < 65536), ("--replicas", self.replicas >= 1),
                 ("--metrics-port", 0 < self.metrics_port < 65536),
                 ("--ingress", self.ingress in ("auto", "haproxy", "proxy")),
                 ("--max-batch-size", self.max_batch_size >= 1),
                 ("--batch-wait-ms", self.batch_wait_ms >= 0),
                 ("--decode-threads", self.decode_threads >= 0),
                 ("--num-cpus", self.num_cpus > 0), ("--num-gpus", self.num_gpus >= 0),
                 ("--max-body-mb", self.max_body_mb > 0),
                 ("--top-k", self.top_k >= 1), ("--request-timeout-s", self.request_timeout_s > 0),
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


def read_auth_token(env_var: str | None) -> str | None:
    """The bearer token from `env_var`, or None when auth is off."""
    if not env_var:
        return None
    token = os.environ.get(env_var, "")
    if not token:
        raise ClfsysError(f"--auth-token-env {env_var}: the environment variable is not set "
                          "or empty")
    return token


class ReplicaMetrics:
    """Prometheus metrics of one replica, through Ray's metrics agent (prefix `ray_`)."""

    LATENCY_S = [0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
    BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256]

    def __init__(self, name: str, model_id: str):
        from ray.util.metrics import Counter, Histogram

        self.tags = {"model": name, "model_id": model_id}
        model = ("model", "model_id")
        self.requests = Counter("clfsys_requests", "HTTP requests by route, method and status",
                                tag_keys=(*model, "route", "method", "status"))
        self.latency = Histogram("clfsys_request_seconds", "Request latency in the replica",
                                 boundaries=self.LATENCY_S, tag_keys=(*model, "route"))
        self.batches = Histogram("clfsys_batch_size", "Images per model call",
                                 boundaries=self.BATCH, tag_keys=model)
        self.decode_errors = Counter("clfsys_decode_errors", "Images that failed to decode, "
                                     "by kind", tag_keys=(*model, "kind"))

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.inc(1, {**self.tags, "route": route, "method": method,
                              "status": str(status)})
        self.latency.observe(seconds, {**self.tags, "route": route})

    def batch(self, size: int) -> None:
        self.batches.observe(size, self.tags)

    def decode_error(self, kind: str) -> None:
        self.decode_errors.inc(1, {**self.tags, "kind": kind})


class ModelServer:
    """The Serve deployment class (bound in `build_app`): one Predictor, batched, with the
    routes of clfsys.http. Implements http.Backend."""

    def __init__(self, source, name: str, options: ServeOptions, token_sha256: str | None):
        import ray

        from clfsys.batcher import Batcher
        from clfsys.predict import Predictor

        self.predictor = Predictor(source.open(), top_k=options.top_k)
        self.name, self.options, self.token_sha256 = name, options, token_sha256
        self.model_id = self.predictor.model_id
        self.class_names = self.predictor.class_names
        self.input_shape = self.predictor.bundle.input_shape
        self.metadata = self.predictor.bundle.metadata
        self.node_id = ray.get_runtime_context().get_node_id()
        self.max_batch_size = options.max_batch_size
        self.metrics = ReplicaMetrics(name, self.model_id)
        self._handles: dict[str, tuple[Any, float]] = {}
        self._decoder = (ThreadPoolExecutor(options.decode_threads, "decode")
                         if options.decode_threads else None)
        self._batcher = Batcher(self._run, options.max_batch_size, options.batch_wait_ms / 1000)
        self.predictor.warm_up()  # before reporting ready

    def __serve_build_asgi_app__(self):
        from clfsys import http

        limits = http.Limits(max_body_bytes=int(self.options.max_body_mb * 1024 * 1024))
        self._api = http.build_api(self, limits, self.token_sha256, self.metrics)
        if self.options.route_prefix != "/":
            return self._api
        return http.NameRouter(self._api, self.name, self.forward, limits)

    async def forward(self, name: str, request: dict[str, Any]):
        """A request for model `name`, answered by that application's replicas (None when no
        clfsys model of that name runs on this cluster)."""
        from ray import serve
        from ray.serve.exceptions import RayServeException

        handle, resolved = self._handles.get(name, (None, 0.0))
        if handle is None or time.monotonic() - resolved > HANDLE_TTL_S:
            try:  # (the controller's answer; a blocking call, so off the event loop)
                handle = await asyncio.to_thread(serve.get_app_handle, name)
            except RayServeException:
                self._handles.pop(name, None)
                return None
            self._handles[name] = (handle, time.monotonic())
        try:
            return await asyncio.wait_for(handle.answer_forwarded.remote(request),
                                          self.options.request_timeout_s)
        except Exception as exc:  # noqa: BLE001 (any failure of the other app: a 502 here)
            self._handles.pop(name, None)
            logging.getLogger("ray.serve").exception("model %r did not answer a forwarded "
                                                     "request", name)
            from clfsys.http import Forwarded

            body = json.dumps({"error": f"model {name!r} did not answer: "
                               f"{type(exc).__name__}: {str(exc)[:200]}"}).encode()
            return Forwarded(502, [(b"content-type", b"application/json")], body)

    async def answer_forwarded(self, request: dict[str, Any]):
        """Called by the root application's `forward`: the request through this app's routes."""
        from clfsys.http import call_asgi

        return await call_asgi(self._api, request)

    def check_health(self) -> None:  # Serve calls this; raising marks the replica dead
        if self.predictor is None:
            raise RuntimeError("model not loaded")

    def model_info(self) -> dict[str, str]:
        """For `clfsys serve` itself (a model swap reports the model_id before and after)."""
        return {"name": self.name, "model_id": self.model_id}

    async def decode(self, data: bytes) -> np.ndarray:
        # A small image decodes faster than a hop to a thread and back (28x28 PNGs: 1,033 vs
        # 757 requests/s in benchmarks/serve.py); a large one would stall every other request.
        self._batcher.expect()  # (the next batch may wait for this image)
        try:
            if self._decoder is None or len(data) <= INLINE_DECODE_BYTES:
                return self.predictor.decode(data)
            return await asyncio.get_running_loop().run_in_executor(
                self._decoder, self.predictor.decode, data)
        except BaseException:
            self._batcher.unexpect()
            raise

    async def classify(self, image: np.ndarray) -> dict[str, Any]:
        return await self._batcher.submit(image)

    def _run(self, batch: list[np.ndarray]) -> list[dict[str, Any]]:
        self.metrics.batch(len(batch))
        return self.predictor.rows(np.stack(batch))


def build_app(model: str | Path, options: ServeOptions | None = None,
              token: str | None = None):
    """The Serve application for a bundle at a local path or URI (not started)."""
    from ray import serve

    from clfsys import bundle, http

    options = options or ServeOptions()
    options.check()
    found = bundle.load(model)
    found.load_model()  # fail fast, in the caller, on a bad bundle
    config: dict[str, Any] = {
        "name": DEPLOYMENT, "graceful_shutdown_timeout_s": 20, "health_check_period_s": 2,
        "health_check_timeout_s": 10,
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus,
                              "runtime_env": {"env_vars": replica_env(options.num_cpus)}},
        "max_ongoing_requests": max(64, 4 * options.max_batch_size),
        "logging_config": {"enable_access_log": options.access_log},
    }
    if options.max_replicas_per_node:
        config["max_replicas_per_node"] = options.max_replicas_per_node
    if options.min_replicas is not None or options.max_replicas is not None:
        config["autoscaling_config"] = {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests}
    else:
        config["num_replicas"] = options.replicas
    deployment = serve.deployment(**config)(serve.ingress()(ModelServer))
    digest = http.token_digest(token) if token else None
    return deployment.bind(bundle.portable(found), options.name, options, digest)


def app_builder(args: dict[str, Any]):
    """Import path for `serve run clfsys.serve:app_builder model=DIR` and Serve config files.

    `args`: model (required) and any ServeOptions field; auth_token_env names an environment
    variable of the replicas' runtime environment that holds the bearer token.
    """
    model, options = app_args(args)
    return build_app(model, options, token=read_auth_token(options.auth_token_env))


def app_args(args: dict[str, Any]) -> tuple[str, ServeOptions]:
    """`app_builder`'s args as the bundle's location and checked ServeOptions (also used to
    check a Serve config file, e.g. the RayService's, without starting anything)."""
    args = dict(args)
    model = args.pop("model", None)
    if not model:
        raise ClfsysError("app_builder needs args.model: the bundle's URI or directory")
    # `serve run ... key=value` passes strings; config files pass typed YAML values.
    found = from_values(ServeOptions, args, "serve option")
    found.check()
    return model, found
