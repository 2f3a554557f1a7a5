"""TF Serving's REST API: POST /v1/models/{name}:predict ({"instances": [{"b64": ...}]}), GET
/v1/models/{name} and /v1/models/{name}/metadata."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, create_model

from clfsys.http import core
from clfsys.http.core import OUTPUTS, Route, answer, service


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


TFServingPrediction = create_model(
    "TFServingPrediction", **{o.name: (o.python_type, ...) for o in OUTPUTS})


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


def tf_instances(request: TFServingPredictRequest,
                 input_shape: tuple[int, int, int]) -> list[bytes | np.ndarray]:
    """Each instance as encoded image bytes ({"b64": ...}) or a pixel array."""
    out: list[bytes | np.ndarray] = []
    for i, instance in enumerate(request.instances):
        where = f"instances[{i}]"
        if isinstance(instance, TFServingNamedImage):
            instance, where = instance.image, f"{where}.image"
        if isinstance(instance, TFServingB64):
            out.append(core.b64_bytes(instance.b64, f"{where}.b64"))
        else:
            out.append(core.pixels(instance, tuple(input_shape), where))
    return out


async def tf_predict(request: Request):
    found = service(request)
    found.check_name(request.path_params["model"])
    body = await core.read_body(request, found.limits)
    parsed = core.parse_json(TFServingPredictRequest, body, "predict request")
    rows = await found.classify(tf_instances(parsed, found.backend.input_shape))
    return answer({"predictions": [{o.name: r[o.name] for o in OUTPUTS} for r in rows]})


async def tf_status(request: Request, model: str):
    service(request).check_name(model)
    return {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {
        "error_code": "OK", "error_message": ""}}]}


def _tensor(dtype: str, dims: list[int]) -> dict[str, Any]:
    return {"dtype": dtype, "tensor_shape": {"dim": [{"size": str(d)} for d in dims]}}


async def tf_metadata(request: Request, model: str):
    found = service(request)
    found.check_name(model)
    classes = len(found.backend.class_names)
    signature = {"method_name": "tensorflow/serving/predict",
                 "inputs": {"image": {"name": "image", **_tensor("DT_STRING", [-1])}},
                 "outputs": {o.name: _tensor(o.tf_dtype, [-1, classes] if o.per_class else [-1])
                             for o in OUTPUTS}}
    return {"model_spec": {"name": found.name, "signature_name": "", "version": "1"},
            "metadata": {"signature_def": {"signature_def": {"serving_default": signature}},
                         "model_id": found.backend.model_id}}


# :predict before the others: Starlette answers a wrong method with the first route whose path
# matches.
ROUTES = (
    Route("POST", "/v1/models/{model}:predict", tf_predict, TFServingPredictResponse,
          inference=True, json_body=TFServingPredictRequest, errors=(400, 404, 413, 422),
          summary="TF Serving: predict (row format, base64 images or pixel arrays)"),
    Route("GET", "/v1/models/{model}", tf_status, TFServingModelStatus, guarded=False,
          errors=(404,), summary="TF Serving: model status"),
    Route("GET", "/v1/models/{model}/metadata", tf_metadata, TFServingMetadata, errors=(404,),
          summary="TF Serving: model metadata (signature)"),
)
