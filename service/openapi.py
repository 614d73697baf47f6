"""The service's OpenAPI document: FastAPI's routes plus the two raw assign endpoints.

The raw ASGI ``/assign`` and ``/assign/batch`` routes are invisible to FastAPI, so their
operations (JSON and raw float32 bodies, every error answer) are written here from the
pydantic schemas of :mod:`oclust.service.schemas`.

Example:
    >>> from fastapi import FastAPI
    >>> app = FastAPI(title="oclust", description=DESCRIPTION)
    >>> install_openapi(app, secured=True, protected=frozenset({"/assign"}))
    >>> op = app.openapi()["paths"]["/assign/batch"]["post"]
    >>> sorted(op["requestBody"]["content"]), op["security"]
    (['application/json', 'application/octet-stream'], [{'APIKeyHeader': []}])
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from oclust.service.assign import BINARY, JSON
from oclust.service.schemas import (
    AssignBatchRequest,
    AssignBatchResponse,
    AssignRequest,
    AssignResponse,
    ErrorResponse,
    NotReadyResponse,
)

__all__ = ["DESCRIPTION", "install_openapi"]

DESCRIPTION = """
Assigns points to the nearest centroid of the latest model snapshot trained online by the
oclust worker, hot-reloading new snapshots, and exports collapse/drift metrics.

Errors: 401 missing or wrong `X-API-Key` (when the server has one), 408 body not sent in time,
413 body too large, 415 Content-Type neither `application/json` nor `application/octet-stream`,
422 invalid input (the `detail` says what; features beyond the bound: `out_of_range`),
503 no snapshot loaded yet.

Binary batches: `POST /assign/batch` with `Content-Type: application/octet-stream` takes the
samples as raw little-endian float32 values, row after row (each row is the model's
`input_shape`, see GET /model; the row count is the body length / (4 · prod(input_shape))).
With `Accept: application/octet-stream` the answer is binary too: N little-endian int32
clusters, then N little-endian float32 squared distances; the snapshot version is in the
`X-Oclust-Version` header and N in `X-Oclust-Count`. Either input works with either answer.
"""

_ERRORS: dict[str, tuple[str, type]] = {
    "401": ("missing or wrong X-API-Key (only when the server has an API key)", ErrorResponse),
    "408": ("request body not received in time (OCLUST_BODY_TIMEOUT)", ErrorResponse),
    "413": ("request body over the size limit (OCLUST_MAX_BODY_BYTES)", ErrorResponse),
    "415": ("Content-Type is neither application/json nor application/octet-stream",
            ErrorResponse),
    "422": ("invalid input; `detail` says what is wrong", ErrorResponse),
    "503": ("no snapshot loaded yet; `reason` says why", NotReadyResponse),
}


def _ref(model: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


_RAW_IN = {"schema": {"type": "string", "format": "binary", "description": (
    "raw little-endian float32 samples, row after row (rows = length / (4 * prod(input_shape)))")}}
_RAW_OUT = {"schema": {"type": "string", "format": "binary", "description": (
    "N little-endian int32 clusters, then N little-endian float32 distances; headers "
    "X-Oclust-Version (snapshot version) and X-Oclust-Count (N)")}}


def _assign_operation(
    summary: str, description: str, request: type, response: type, secured: bool, raw: bool
) -> dict[str, Any]:
    ok: dict[str, Any] = {JSON: {"schema": _ref(response)}}
    body: dict[str, Any] = {JSON: {"schema": _ref(request)}}
    if raw:
        ok[BINARY], body[BINARY] = _RAW_OUT, _RAW_IN
    responses = {"200": {"description": "assigned", "content": ok}}
    for code, (text, model) in _ERRORS.items():
        responses[code] = {"description": text, "content": {JSON: {"schema": _ref(model)}}}
    op: dict[str, Any] = {
        "summary": summary,
        "description": description,
        "operationId": summary.lower().replace(" ", "_"),
        "requestBody": {"required": True, "content": body},
        "responses": responses,
    }
    if secured:
        op["security"] = [{"APIKeyHeader": []}]
    return op


def install_openapi(app: FastAPI, secured: bool, protected: frozenset[str]) -> None:
    """OpenAPI for the FastAPI routes plus the two plain ASGI assign endpoints.

    With an API key, the ``protected`` GET endpoints are marked as secured too.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (AssignRequest, AssignBatchRequest, AssignResponse, AssignBatchResponse,
                      ErrorResponse, NotReadyResponse):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(s.pop("$defs", {}))
            schemas[model.__name__] = s
        if secured:
            schema["components"]["securitySchemes"] = {
                "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            }
        paths = {
            "/assign": {"post": _assign_operation(
                "Assign one sample",
                "Nearest centroid of one sample, its squared latent distance and the version "
                "of the snapshot that answered.",
                AssignRequest, AssignResponse, secured, raw=False,
            )},
            "/assign/batch": {"post": _assign_operation(
                "Assign a batch",
                "Nearest centroids of several samples of the same shape, in request order, "
                "all answered by one snapshot version. At most OCLUST_MAX_BATCH items. Also "
                "takes raw float32 rows (application/octet-stream) and answers in binary with "
                "`Accept: application/octet-stream` (format in the API description).",
                AssignBatchRequest, AssignBatchResponse, secured, raw=True,
            )},
        }
        schema["paths"] = {**paths, **schema.get("paths", {})}
        for path in protected if secured else ():
            for op in schema["paths"].get(path, {}).values():
                op["security"] = [{"APIKeyHeader": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
