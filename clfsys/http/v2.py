"""The Open Inference Protocol (KServe V2): /v2/health/{live,ready}, /v2/models/{name}[/ready],
POST /v2/models/{name}/infer with a BYTES tensor of encoded images or a UINT8 tensor of pixels,
in JSON or with the binary tensor extension."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from clfsys.http.core import (
    OUTPUT_NAMES,
    OUTPUTS,
    HttpError,
    Route,
    answer,
    b64_bytes,
    parse_json,
    pixels,
    read_body,
    service,
)


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


def split_binary_extension(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part) of a V2 request that may use the binary tensor extension."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise HttpError(400, f"Inference-Header-Content-Length {header_length!r} does not fit "
                             f"the {len(body):,}-byte body")
    n = int(header_length)
    return body[:n], body[n:]


def _flatten(values: list[Any]) -> list[Any]:
    out: list[Any] = []
    for v in values:
        out.extend(_flatten(v) if isinstance(v, list) else [v])
    return out


def _binary_elements(raw: bytes, where: str) -> list[bytes]:
    """The elements of a BYTES tensor in the binary extension: each a 4-byte length, then it."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise HttpError(400, f"{where}: truncated BYTES element length")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
        if offset > len(raw):
            raise HttpError(400, f"{where}: truncated BYTES element")
    return items


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
            items = _binary_elements(raw, where)
        else:
            items = [b64_bytes(v, f"{where}[{i}]") for i, v in enumerate(_flatten(tensor.data))]
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
            return list(np.frombuffer(raw, dtype=np.uint8).reshape(tensor.shape))
        return list(pixels(tensor.data, tuple(tensor.shape), where))
    raise HttpError(400, f"{where}: datatype must be BYTES (encoded images) or UINT8 (pixels), "
                         f"got {tensor.datatype!r}")


def v2_outputs(rows: list[dict[str, Any]], requested: list[V2RequestedOutput] | None,
               classes: int) -> list[dict[str, Any]]:
    """The requested output tensors (all by default), each shaped as a V2Tensor."""
    names = [o.name for o in requested] if requested else list(OUTPUT_NAMES)
    unknown = [name for name in names if name not in OUTPUT_NAMES]
    if unknown:
        raise HttpError(400, f"unknown output {unknown[0]!r}; outputs are "
                             f"{', '.join(OUTPUT_NAMES)}")
    n, tensors = len(rows), []
    for name in names:
        (output,) = [o for o in OUTPUTS if o.name == name]
        if output.per_class:
            shape, data = [n, classes], [v for r in rows for v in r[name]]
        else:
            shape, data = [n], [r[name] for r in rows]
        tensors.append({"name": name, "datatype": output.v2_datatype, "shape": shape,
                        "data": data})
    return tensors


async def v2_live(request: Request):
    return {"live": True}


async def v2_ready(request: Request):
    return {"ready": True}


async def v2_model_ready(request: Request, model: str):
    found = service(request)
    found.check_name(model)
    return {"name": found.name, "ready": True}


async def v2_metadata(request: Request, model: str):
    found = service(request)
    found.check_name(model)
    backend, classes = found.backend, len(found.backend.class_names)
    return {"name": found.name, "versions": [backend.model_id], "platform": "tensorflow_keras",
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8",
                        "shape": [-1, *backend.input_shape]}],
            "outputs": [{"name": o.name, "datatype": o.v2_datatype,
                         "shape": [-1, classes] if o.per_class else [-1]} for o in OUTPUTS]}


async def v2_infer(request: Request):
    found = service(request)
    found.check_name(request.path_params["model"])
    backend = found.backend
    body = await read_body(request, found.limits)
    json_part, binary = split_binary_extension(
        body, request.headers.get("inference-header-content-length"))
    parsed = parse_json(V2InferRequest, json_part, "inference request")
    items = v2_inputs(parsed, binary, backend.input_shape)
    if not items:
        raise HttpError(400, "the input holds no images")
    rows = await found.classify(items)
    response = {"model_name": found.name, "model_version": backend.model_id,
                "outputs": v2_outputs(rows, parsed.outputs, len(backend.class_names))}
    return answer(response if parsed.id is None else {**response, "id": parsed.id})


ROUTES = (
    Route("POST", "/v2/models/{model}/infer", v2_infer, V2InferResponse, inference=True,
          json_body=V2InferRequest, errors=(400, 404, 413, 422),
          summary="V2: infer (BYTES images or UINT8 pixels; JSON or binary extension)"),
    Route("GET", "/v2/health/live", v2_live, V2Live, guarded=False, summary="V2: server live"),
    Route("GET", "/v2/health/ready", v2_ready, V2Ready, guarded=False, summary="V2: server ready"),
    Route("GET", "/v2/models/{model}/ready", v2_model_ready, V2ModelReady, guarded=False,
          errors=(404,), summary="V2: model ready"),
    Route("GET", "/v2/models/{model}", v2_metadata, V2ModelMetadata, errors=(404,),
          summary="V2: model metadata"),
)
