"""The endpoint's HTTP surface, without Ray: typed request and response models, request parsing
and validation, and the FastAPI app that speaks three protocols over one model.

- clfsys's own JSON: POST {prefix}/predict (image/*, application/octet-stream, or multipart
  field `file`), POST {prefix}/predict/batch (multipart), GET {prefix}/metadata, {prefix}/healthz.
- The Open Inference Protocol (KServe V2): {prefix}/v2/health/{live,ready},
  {prefix}/v2/models/{name}[/ready], POST {prefix}/v2/models/{name}/infer, with a BYTES tensor of
  encoded images or a UINT8 tensor of pixels, in JSON or with the binary tensor extension.
- TF Serving's REST API: POST {prefix}/v1/models/{name}:predict ({"instances": [{"b64": ...}]}),
  GET {prefix}/v1/models/{name} and {prefix}/v1/models/{name}/metadata.

The default model's prefix is the server root. Every 4xx is `{"error": "..."}`, which is also the
error shape of both standard protocols. `build_api(backend, ...)` takes any `Backend`: the Serve
replica in clfsys.serve, or `DirectBackend` (a Predictor in this process).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import to_json
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from clfsys import images

IMAGE_ERROR_STATUS = {images.EMPTY: 400, images.NOT_AN_IMAGE: 422, images.TRUNCATED: 422,
                      images.TOO_MANY_PIXELS: 422}


# ---------------------------------------------------------------- typed bodies (OpenAPI schema)

class Error(BaseModel):
    error: str = Field(description="What was wrong with the request, in one line")


class TopK(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    label: str
    label_index: int
    confidence: float = Field(description="The top class's probability")
    top_k: list[TopK]
    model_id: str


class TestMetrics(BaseModel):
    accuracy: float | None
    loss: float | None


class Metadata(BaseModel):
    name: str = Field(description="The model's name on this server (the Serve application)")
    model_id: str
    classes: list[str]
    input_shape: list[int]
    color_mode: str
    resize: str = Field(description="How uploaded images reach input_shape: stretch, pad "
                        "(aspect ratio kept, black borders) or crop (aspect ratio kept, centre)")
    test_metrics: TestMetrics
    max_batch_size: int


class Health(BaseModel):
    status: str
    name: str
    model_id: str
    node_id: str | None = Field(description="The Ray node of the replica that answered")


class V2Tensor(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(
        default=None, description="Row-major values; BYTES elements as base64 strings. Absent "
        "when the tensor travels in the binary extension (parameters.binary_data_size)")


class V2InputTensor(V2Tensor):
    datatype: Literal["BYTES", "UINT8"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=4)


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2InputTensor] = Field(min_length=1, max_length=1, description=(
        "One tensor: BYTES [N] of encoded images, or UINT8 [N, H, W, C] of pixels"))
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class TFServingB64(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(description="The encoded image, base64")


class TFServingNamedImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: TFServingB64


class TFServingPredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    signature_name: str | None = None
    instances: list[TFServingB64 | TFServingNamedImage | list[Any]] = Field(
        min_length=1, description='Each {"b64": "<base64 image bytes>"} (or {"image": '
        '{"b64": ...}}), or an [H, W, C] array of uint8 pixels')


class TFServingPrediction(BaseModel):
    label: str
    label_index: int
    confidence: float
    probabilities: list[float]


class TFServingPredictResponse(BaseModel):
    predictions: list[TFServingPrediction]


class TFServingStatus(BaseModel):
    error_code: str
    error_message: str


class TFServingVersionStatus(BaseModel):
    version: str
    state: str
    status: TFServingStatus


class TFServingModelStatus(BaseModel):
    model_version_status: list[TFServingVersionStatus]


class TFServingMetadata(BaseModel):
    model_spec: dict[str, Any]
    metadata: dict[str, Any]


# ---------------------------------------------------------------- the model behind the routes

class Backend(Protocol):
    """What the routes need from the model: the Serve replica, or DirectBackend."""

    name: str
    model_id: str
    class_names: list[str]
    input_shape: tuple[int, int, int]
    metadata: dict[str, Any]
    node_id: str | None
    max_batch_size: int

    async def decode(self, data: bytes) -> np.ndarray:
        """Image bytes -> the model's uint8 input (raises images.ImageError); off the loop."""

    async def classify(self, image: np.ndarray) -> dict[str, Any]:
        """One (H, W, C) uint8 image -> one `Predictor.rows` record (batched by the backend)."""


class DirectBackend:
    """A Predictor in this process, batch of one per call: for tools and tests without Ray."""

    def __init__(self, predictor, name: str = "clfsys", max_batch_size: int = 32):
        self.predictor, self.name, self.max_batch_size = predictor, name, max_batch_size
        self.model_id = predictor.model_id
        self.class_names = predictor.class_names
        self.input_shape = predictor.bundle.input_shape
        self.metadata = predictor.bundle.metadata
        self.node_id = None

    async def decode(self, data: bytes) -> np.ndarray:
        return await asyncio.to_thread(self.predictor.decode, data)

    async def classify(self, image: np.ndarray) -> dict[str, Any]:
        (row,) = await asyncio.to_thread(self.predictor.rows, image[None])
        return row


class Metrics(Protocol):
    def request(self, route: str, method: str, status: int, seconds: float) -> None: ...
    def decode_error(self, kind: str) -> None: ...


# ---------------------------------------------------------------- parsing and validation

class HttpError(Exception):
    """A 4xx answer: `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_files: int = 256


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_bearer(header: str, token_sha256: str | None) -> None:
    """Raise 401 unless `header` is 'Bearer <token>' with the configured token."""
    if token_sha256 is None:
        return
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
            token_digest(presented.strip()), token_sha256):
        raise HttpError(401, "missing or invalid bearer token")


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


async def read_body(request, limits: Limits) -> bytes:
    """The request body, refused with 413 as soon as it passes the limit."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise HttpError(413, f"body of {int(declared):,} bytes exceeds the "
                             f"{limits.max_body_bytes:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise HttpError(413, f"body exceeds the {limits.max_body_bytes:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_files(headers, body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    """(field name, bytes) of each uploaded file of a multipart body, in order."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(headers, stream(), max_files=limits.max_files,
                                     max_fields=limits.max_files).parse()
    except (MultiPartException, ValueError, KeyError) as exc:
        raise HttpError(400, f"malformed multipart body: {exc}") from None
    return [(name, await value.read()) for name, value in form.multi_items()
            if isinstance(value, UploadFile)]


async def image_bodies(request, body: bytes, batch: bool, limits: Limits) -> list[bytes]:
    """The encoded images of a /predict (one) or /predict/batch (several) request."""
    kind = media_type(request.headers.get("content-type", ""))
    if kind == "multipart/form-data":
        if not body:
            raise HttpError(400, "empty body")
        files = await multipart_files(request.headers, body, limits)
        if not batch:
            files = [f for f in files if f[0] == "file"][:1]
            if not files:
                raise HttpError(400, "multipart body has no 'file' field")
        if not files:
            raise HttpError(400, "multipart body has no files")
        return [data for _, data in files]
    if batch:
        raise HttpError(415, f"/predict/batch takes multipart/form-data, got "
                             f"{kind or 'no content type'!r}")
    if not (kind.startswith("image/") or kind == "application/octet-stream"):
        raise HttpError(415, f"unsupported content type {kind or '(none)'!r}; send image/* or "
                             "application/octet-stream, or multipart with a 'file' field")
    if not body:
        raise HttpError(400, "empty body")
    return [body]


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(400, f"{where}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{where}: not valid base64") from None


def _pixels(values: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A uint8 array of `shape` from JSON numbers (nested or flat), or 400."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise HttpError(400, f"{where}: pixels must be numbers") from None
    if array.size != int(np.prod(shape)):
        raise HttpError(400, f"{where}: expected {int(np.prod(shape)):,} values for shape "
                             f"{list(shape)}, got {array.size:,}")
    if not np.all((array >= 0) & (array <= 255) & (array == np.floor(array))):
        raise HttpError(400, f"{where}: pixels must be integers from 0 to 255")
    return array.astype(np.uint8).reshape(shape)


def split_binary_extension(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a V2 request that may use the binary tensor extension."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise HttpError(400, f"Inference-Header-Content-Length {header_length!r} does not fit "
                             f"the {len(body):,}-byte body")
    n = int(header_length)
    return body[:n], body[n:]


def parse_json(model: type[BaseModel], body: bytes, what: str):
    """`body` as `model`, or 400 naming the first field that is wrong."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HttpError(400, f"invalid {what}: {where}: {first['msg']}") from None


def v2_inputs(request: V2InferRequest, binary: bytes,
              input_shape: tuple[int, int, int]) -> list[bytes | np.ndarray]:
    """The images of the one input: encoded bytes (BYTES) or pixel arrays (UINT8)."""
    (tensor,) = request.inputs
    where = f"input {tensor.name!r}"
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise HttpError(400, f"{where}: binary_data_size {size!r} does not fit the "
                                 f"{len(binary):,} bytes after the JSON header")
        raw = binary[:size]
    elif tensor.data is None:
        raise HttpError(400, f"{where}: no data and no binary_data_size")
    if any(not isinstance(d, int) or d < 0 for d in tensor.shape) or not tensor.shape:
        raise HttpError(400, f"{where}: bad shape {tensor.shape}")
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise HttpError(400, f"{where}: BYTES shape must be [N] or [N, 1], got "
                                 f"{tensor.shape}")
        if size is not None:
            items, offset = [], 0
            while offset < len(raw):
                if offset + 4 > len(raw):
                    raise HttpError(400, f"{where}: truncated BYTES element length")
                length = int.from_bytes(raw[offset:offset + 4], "little")
                items.append(raw[offset + 4:offset + 4 + length])
                offset += 4 + length
                if offset > len(raw):
                    raise HttpError(400, f"{where}: truncated BYTES element")
        else:
            items = [_b64(v, f"{where}[{i}]") for i, v in enumerate(_flatten(tensor.data))]
        if len(items) != count:
            raise HttpError(400, f"{where}: shape {tensor.shape} needs {count} elements, got "
                                 f"{len(items)}")
        return items
    if tensor.datatype == "UINT8":
        if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != tuple(input_shape):
            expected = ", ".join(map(str, input_shape))
            raise HttpError(400, f"{where}: UINT8 shape must be [N, {expected}], got "
                                 f"{tensor.shape}")
        if size is not None:
            if len(raw) != count:
                raise HttpError(400, f"{where}: {len(raw):,} bytes for shape {tensor.shape}")
            pixels = np.frombuffer(raw, dtype=np.uint8).reshape(tensor.shape)
        else:
            pixels = _pixels(tensor.data, tuple(tensor.shape), where)
        return list(pixels)
    raise HttpError(400, f"{where}: datatype must be BYTES (encoded images) or UINT8 (pixels), "
                         f"got {tensor.datatype!r}")


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


V2_OUTPUTS = ("label", "label_index", "confidence", "probabilities")


def v2_outputs(rows: list[dict[str, Any]], requested: list[V2RequestedOutput] | None,
               classes: int) -> list[dict[str, Any]]:
    """The requested output tensors (all by default), each shaped as a V2Tensor."""
    n = len(rows)
    names = [o.name for o in requested] if requested else list(V2_OUTPUTS)
    unknown = [name for name in names if name not in V2_OUTPUTS]
    if unknown:
        raise HttpError(400, f"unknown output {unknown[0]!r}; outputs are {', '.join(V2_OUTPUTS)}")
    tensors = {
        "label": ("BYTES", [n], [r["label"] for r in rows]),
        "label_index": ("INT64", [n], [r["label_index"] for r in rows]),
        "confidence": ("FP32", [n], [r["confidence"] for r in rows]),
        "probabilities": ("FP32", [n, classes], [p for r in rows for p in r["probabilities"]]),
    }
    return [{"name": name, "datatype": tensors[name][0], "shape": tensors[name][1],
             "data": tensors[name][2]} for name in names]


def tf_instances(request: TFServingPredictRequest,
                 input_shape: tuple[int, int, int]) -> list[bytes | np.ndarray]:
    """Each instance as encoded image bytes ({"b64": ...}) or a pixel array."""
    out: list[bytes | np.ndarray] = []
    for i, instance in enumerate(request.instances):
        where = f"instances[{i}]"
        if isinstance(instance, TFServingNamedImage):
            instance, where = instance.image, f"{where}.image"
        if isinstance(instance, TFServingB64):
            out.append(_b64(instance.b64, f"{where}.b64"))
        else:
            out.append(_pixels(instance, tuple(input_shape), where))
    return out


def answer(payload: Any) -> Response:
    """A JSON answer built by this module to its route's response model. FastAPI would validate
    it against that model once more and then serialize it; the inference routes skip that (the
    schema tests check the answers against the OpenAPI document)."""
    return Response(to_json(payload), media_type="application/json")


# ---------------------------------------------------------------- the app

def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    meaning = {400: "Malformed request or empty image", 401: "Missing or invalid bearer token",
               404: "No model of that name here", 413: "Body over the size limit",
               415: "Unsupported content type", 422: "Not a decodable image"}
    return {code: {"model": Error, "description": meaning[code]} for code in codes}


_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": _BINARY},
    "application/octet-stream": {"schema": _BINARY},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": _BINARY}}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": _BINARY, "minItems": 1}}}}}}}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A JSON request body of `model`, on a route whose {model} parameter the handler reads
    itself: FastAPI's validation of a declared path parameter costs each request ~8 us."""
    return {"parameters": [{"name": "model", "in": "path", "required": True,
                            "schema": {"type": "string", "title": "Model"}}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def build_api(backend: Backend, limits: Limits, token_sha256: str | None = None,
              metrics: Metrics | None = None):
    """The FastAPI app for one model. Routes are relative to the app's prefix."""
    name = backend.name
    # telemetry off: the endpoint has its own Prometheus metrics, and FastAPI's check for an
    # OpenTelemetry provider costs every request ~3 us.
    api = FastAPI(title=f"clfsys: {name}", docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False},
                  description="Image classification with a clfsys model bundle: POST an image "
                  "to /predict, or use the Open Inference Protocol (/v2) or TF Serving's REST "
                  "API (/v1). Errors are {\"error\": \"...\"}.")
    bearer = HTTPBearer(auto_error=False, description="The token in --auth-token-env")

    async def authorized(request: Request) -> None:
        check_bearer(request.headers.get("authorization", ""), token_sha256)

    guard = [Depends(bearer), Depends(authorized)] if token_sha256 else []
    auth_errors = (401,) if token_sha256 else ()

    @api.exception_handler(HttpError)
    async def _http_error(_request, exc: HttpError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @api.exception_handler(StarletteHTTPException)
    async def _routing_error(request: Request, exc: StarletteHTTPException):
        # An unknown route or method: the documented Error shape, not FastAPI's {"detail"},
        # so that a protocol client (tritonclient reads "error") can decode it.
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse({"error": message}, status_code=exc.status_code,
                            headers=exc.headers)

    def check_name(model: str) -> None:
        if model != name:
            raise HttpError(404, f"no model {model!r} on this server; this is {name!r}")

    async def decode(data: bytes) -> np.ndarray:
        try:
            return await backend.decode(data)
        except images.ImageError as exc:
            if metrics is not None:
                metrics.decode_error(exc.kind)
            raise HttpError(IMAGE_ERROR_STATUS.get(exc.kind, 422), str(exc)) from None

    async def classify(items: list[Any]) -> list[dict[str, Any]]:
        arrays = [item if isinstance(item, np.ndarray) else await decode(item)
                  for item in items]
        return list(await asyncio.gather(*(backend.classify(a) for a in arrays)))

    def prediction(row: dict[str, Any]) -> dict[str, Any]:
        return {"label": row["label"], "label_index": row["label_index"],
                "confidence": row["confidence"], "top_k": row["top_k"],
                "model_id": backend.model_id}

    # -- clfsys JSON
    @api.post("/predict", response_model=Prediction, dependencies=guard,
              openapi_extra=IMAGE_BODY, responses=_errors(400, *auth_errors, 413, 415, 422),
              summary="Label one image: a raw image body or multipart field 'file'")
    async def predict(request: Request):
        body = await read_body(request, limits)
        (row,) = await classify(await image_bodies(request, body, False, limits))
        return answer(prediction(row))

    @api.post("/predict/batch", response_model=list[Prediction], dependencies=guard,
              openapi_extra=BATCH_BODY, responses=_errors(400, *auth_errors, 413, 415, 422),
              summary="Label several images (multipart files), answers in order")
    async def predict_batch(request: Request):
        body = await read_body(request, limits)
        return answer([prediction(r) for r in await classify(
            await image_bodies(request, body, True, limits))])

    @api.get("/metadata", response_model=Metadata, dependencies=guard,
             responses=_errors(*auth_errors), summary="Classes, input, model_id, test metrics")
    async def metadata():
        meta = backend.metadata
        test = meta.get("metrics", {})
        return {"name": name, "model_id": backend.model_id, "classes": backend.class_names,
                "input_shape": list(backend.input_shape), "color_mode": meta["color_mode"],
                "resize": meta.get("resize", "stretch"),
                "test_metrics": {"accuracy": test.get("test_accuracy"),
                                 "loss": test.get("test_loss")},
                "max_batch_size": backend.max_batch_size}

    @api.get("/healthz", response_model=Health, summary="200 once the model is loaded and warm")
    async def healthz():
        return {"status": "ok", "name": name, "model_id": backend.model_id,
                "node_id": backend.node_id}

    # -- Open Inference Protocol (KServe V2)
    @api.get("/v2/health/live", response_model=V2Live, summary="V2: server live")
    async def v2_live():
        return {"live": True}

    @api.get("/v2/health/ready", response_model=V2Ready, summary="V2: server ready")
    async def v2_ready():
        return {"ready": True}

    @api.get("/v2/models/{model}/ready", response_model=V2ModelReady,
             responses=_errors(404), summary="V2: model ready")
    async def v2_model_ready(model: str):
        check_name(model)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{model}", response_model=V2ModelMetadata, dependencies=guard,
             responses=_errors(*auth_errors, 404), summary="V2: model metadata")
    async def v2_metadata(model: str):
        check_name(model)
        classes = len(backend.class_names)
        return {"name": name, "versions": [backend.model_id], "platform": "tensorflow_keras",
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                           {"name": "pixels", "datatype": "UINT8",
                            "shape": [-1, *backend.input_shape]}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "label_index", "datatype": "INT64", "shape": [-1]},
                            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
                            {"name": "probabilities", "datatype": "FP32",
                             "shape": [-1, classes]}]}

    @api.post("/v2/models/{model}/infer", response_model=V2InferResponse, dependencies=guard,
              openapi_extra=_json_body(V2InferRequest),
              responses=_errors(400, *auth_errors, 404, 413, 422),
              summary="V2: infer (BYTES images or UINT8 pixels; JSON or binary extension)")
    async def v2_infer(request: Request):
        check_name(request.path_params["model"])
        body = await read_body(request, limits)
        json_part, binary = split_binary_extension(
            body, request.headers.get("inference-header-content-length"))
        infer = parse_json(V2InferRequest, json_part, "inference request")
        items = v2_inputs(infer, binary, backend.input_shape)
        if not items:
            raise HttpError(400, "the input holds no images")
        rows = await classify(items)
        response = {"model_name": name, "model_version": backend.model_id,
                    "outputs": v2_outputs(rows, infer.outputs, len(backend.class_names))}
        return answer(response if infer.id is None else {**response, "id": infer.id})

    # -- TF Serving REST
    # (:predict first: Starlette answers a wrong method with the first route whose path matches)
    @api.post("/v1/models/{model}:predict", response_model=TFServingPredictResponse,
              dependencies=guard, openapi_extra=_json_body(TFServingPredictRequest),
              responses=_errors(400, *auth_errors, 404, 413, 422),
              summary="TF Serving: predict (row format, base64 images or pixel arrays)")
    async def tf_predict(request: Request):
        check_name(request.path_params["model"])
        body = await read_body(request, limits)
        request_body = parse_json(TFServingPredictRequest, body, "predict request")
        rows = await classify(tf_instances(request_body, backend.input_shape))
        return answer({"predictions": [{k: r[k] for k in ("label", "label_index", "confidence",
                                                          "probabilities")} for r in rows]})

    @api.get("/v1/models/{model}", response_model=TFServingModelStatus,
             responses=_errors(404), summary="TF Serving: model status")
    async def tf_status(model: str):
        check_name(model)
        return {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {
            "error_code": "OK", "error_message": ""}}]}

    @api.get("/v1/models/{model}/metadata", response_model=TFServingMetadata,
             dependencies=guard, responses=_errors(*auth_errors, 404),
             summary="TF Serving: model metadata (signature)")
    async def tf_metadata(model: str):
        check_name(model)

        def tensor(dtype, dims):
            return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d)} for d in dims]}}

        classes = len(backend.class_names)
        signature = {"method_name": "tensorflow/serving/predict",
                     "inputs": {"image": {"name": "image", **tensor("DT_STRING", [-1])}},
                     "outputs": {"label": tensor("DT_STRING", [-1]),
                                 "label_index": tensor("DT_INT64", [-1]),
                                 "confidence": tensor("DT_FLOAT", [-1]),
                                 "probabilities": tensor("DT_FLOAT", [-1, classes])}}
        return {"model_spec": {"name": name, "signature_name": "", "version": "1"},
                "metadata": {"signature_def": {"signature_def": {
                    "serving_default": signature}}, "model_id": backend.model_id}}

    # -- docs, behind the same token as the model
    def openapi_schema() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version="1", description=api.description,
                                 routes=api.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # FastAPI documents a 422 for its own parameter validation, which a string path
            # parameter never fails; every 4xx here is an Error.
            for item in schema["paths"].values():
                for operation in item.values():
                    found = operation["responses"].get("422", {})
                    if "HTTPValidationError" in json.dumps(found):
                        del operation["responses"]["422"]
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for model in (V2InferRequest, TFServingPredictRequest):
                found = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            api.openapi_schema = schema
        return api.openapi_schema

    @api.get("/openapi.json", include_in_schema=False, dependencies=guard)
    async def openapi_json():
        return JSONResponse(openapi_schema())

    @api.get("/docs", include_in_schema=False, dependencies=guard)
    async def docs(request: Request):
        prefix = request.scope.get("root_path", "").rstrip("/")
        return HTMLResponse(get_swagger_ui_html(openapi_url=f"{prefix}/openapi.json",
                                                title=api.title).body)

    # Starlette tries routes in order: the three inference routes first (each route tried
    # before the match costs ~3 us a request).
    inference = ("/predict", "/v2/models/{model}/infer", "/v1/models/{model}:predict")
    api.router.routes.sort(key=lambda r: inference.index(r.path) if getattr(
        r, "path", None) in inference else len(inference))
    return MetricsMiddleware(api, metrics) if metrics is not None else api


Forward = Callable[[str, dict[str, Any]], Awaitable["Forwarded | None"]]


@dataclass(frozen=True)
class Forwarded:
    """An HTTP answer produced by another model's app (see NameRouter)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class NameRouter:
    """ASGI middleware of the app at the server root: a V2 or TF Serving request for another
    model's name (/v2/models/NAME/..., /v1/models/NAME...) is handed to that model's app by
    `forward(name, request)`, so every model answers both protocols at the root as well as
    under its own prefix. The named model applies its own auth, limits and metrics. A name no
    app serves falls through to `app`, which answers 404."""

    ROUTE = re.compile(r"^/v[12]/models/([^/:]+)")

    def __init__(self, app, own_name: str, forward: Forward, limits: Limits):
        self.app, self.own_name, self.forward, self.limits = app, own_name, forward, limits

    def __getattr__(self, item):
        return getattr(self.app, item)

    async def __call__(self, scope, receive, send):
        found = self.ROUTE.match(scope.get("path", "")) if scope["type"] == "http" else None
        if found is None or found.group(1) == self.own_name:
            return await self.app(scope, receive, send)
        try:
            body = await read_body(Request(scope, receive), self.limits)
        except HttpError as exc:
            error = JSONResponse({"error": exc.message}, status_code=exc.status)
            return await error(scope, receive, send)
        except ClientDisconnect:
            return
        request = {"method": scope["method"], "path": scope["path"],
                   "query_string": scope.get("query_string", b""),
                   "headers": list(scope.get("headers", [])), "body": body}
        forwarded = await self.forward(found.group(1), request)
        if forwarded is None:
            return await self.app(scope, _receive_once(request["body"]), send)
        await send({"type": "http.response.start", "status": forwarded.status,
                    "headers": forwarded.headers})
        await send({"type": "http.response.body", "body": forwarded.body})


def _receive_once(body: bytes):
    """An ASGI `receive` that gives the whole `body`, then a disconnect."""
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive():
        return next(messages, {"type": "http.disconnect"})

    return receive


async def call_asgi(app, request: dict[str, Any]) -> Forwarded:
    """Run one request (as NameRouter hands it over) through the ASGI `app` in this process."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request["method"], "scheme": "http", "path": request["path"],
             "raw_path": request["path"].encode(), "query_string": request["query_string"],
             "root_path": "", "headers": request["headers"], "client": None, "server": None}
    status, headers, body = 500, [], []

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, _receive_once(request["body"]), send)
    return Forwarded(status, headers, b"".join(body))


class MetricsMiddleware:
    """ASGI middleware: counts requests by route template, method and status, with latency."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    def __getattr__(self, item):  # Serve and tests reach the FastAPI app's attributes
        return getattr(self.app, item)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.request(getattr(route, "path", "unmatched"), scope.get("method", ""),
                                 status, time.perf_counter() - started)
