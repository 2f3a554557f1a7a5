"""clfsys's own routes: POST /predict (image/*, application/octet-stream, or multipart field
`file`), POST /predict/batch (multipart), GET /metadata and /healthz."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field

from clfsys.http.core import HttpError, Limits, Route, answer, read_body, service


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


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


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


def prediction(row: dict[str, Any], model_id: str) -> dict[str, Any]:
    return {"label": row["label"], "label_index": row["label_index"],
            "confidence": row["confidence"], "top_k": row["top_k"], "model_id": model_id}


async def predict(request: Request):
    found = service(request)
    body = await read_body(request, found.limits)
    (row,) = await found.classify(await image_bodies(request, body, False, found.limits))
    return answer(prediction(row, found.backend.model_id))


async def predict_batch(request: Request):
    found = service(request)
    body = await read_body(request, found.limits)
    rows = await found.classify(await image_bodies(request, body, True, found.limits))
    return answer([prediction(r, found.backend.model_id) for r in rows])


async def metadata(request: Request):
    found = service(request)
    backend = found.backend
    meta = backend.metadata
    test = meta.get("metrics", {})
    return {"name": found.name, "model_id": backend.model_id, "classes": backend.class_names,
            "input_shape": list(backend.input_shape), "color_mode": meta["color_mode"],
            "resize": meta.get("resize", "stretch"),
            "test_metrics": {"accuracy": test.get("test_accuracy"),
                             "loss": test.get("test_loss")},
            "max_batch_size": backend.max_batch_size}


async def healthz(request: Request):
    found = service(request)
    return {"status": "ok", "name": found.name, "model_id": found.backend.model_id,
            "node_id": found.backend.node_id}


_BINARY = {"type": "string", "format": "binary"}
IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": _BINARY},
    "application/octet-stream": {"schema": _BINARY},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                       "properties": {"file": _BINARY}}}}}}
BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": _BINARY, "minItems": 1}}}}}}}

ROUTES = (
    Route("POST", "/predict", predict, Prediction, inference=True, upload=IMAGE_BODY,
          errors=(400, 413, 415, 422),
          summary="Label one image: a raw image body or multipart field 'file'"),
    Route("POST", "/predict/batch", predict_batch, list[Prediction], upload=BATCH_BODY,
          errors=(400, 413, 415, 422),
          summary="Label several images (multipart files), answers in order"),
    Route("GET", "/metadata", metadata, Metadata,
          summary="Classes, input, model_id, test metrics"),
    Route("GET", "/healthz", healthz, Health, guarded=False,
          summary="200 once the model is loaded and warm"),
)
