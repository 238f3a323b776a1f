"""The API docs: an OpenAPI 3.1 document built from the proto descriptors, and a Swagger UI.

Nothing here lists an RPC or a field by hand: every method of the ``Vmm`` and ``ProxiedGuestApi``
services becomes ``POST /prpc/<Method>`` (or ``/guest/<Method>``), and every message a JSON schema
following dstack's JSON rules, the ones the codec (``vmm.prpc.codec``) applies: field names stay
snake_case, ``bytes`` are lowercase hex strings (``0x`` accepted on input), 64-bit integers are
plain numbers, absent ``optional`` and message fields are ``null``, and ``google.protobuf.Empty``
is ``null``. The document is built once per process, on the first request.

``/api-docs/docs`` serves Swagger UI from package data (vendored, pinned; see
``console/swagger/VERSION``), so the docs work offline.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor, ServiceDescriptor
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vmm.core.version import __version__
from vmm.rpc import guest_api_pb2, vmm_rpc_pb2

EMPTY = "google.protobuf.Empty"
SWAGGER_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "LICENSE": "text/plain; charset=utf-8",
    "NOTICE": "text/plain; charset=utf-8",
}

_INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32}
_UINT32 = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64}
_UINT64 = {FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every failed call: the reason (in both `error` and `message`) and a stable code.",
    "properties": {
        "error": {"type": "string"},
        "message": {"type": "string"},
        "code": {"type": "string", "examples": ["INVALID_ARGUMENT", "NOT_FOUND", "CONFLICT"]},
    },
    "required": ["error", "message", "code"],
}


def _ref(name: str) -> str:
    return f"#/components/schemas/{name}"


def _scalar_schema(field: FieldDescriptor) -> dict[str, Any]:
    kind = field.type
    if kind in _INT32:
        return {"type": "integer", "format": "int32"}
    if kind in _UINT32:
        return {"type": "integer", "format": "int32", "minimum": 0}
    if kind in _INT64:
        return {"type": "integer", "format": "int64"}
    if kind in _UINT64:
        return {"type": "integer", "format": "int64", "minimum": 0}
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return {"type": ["number", "null"], "description": "null for NaN and infinities"}
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "pattern": "^(0x)?([0-9a-fA-F]{2})*$",
                "description": "bytes as lowercase hex (`0x` accepted on input)"}
    if kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        values = ", ".join(f"{v.number}={v.name}" for v in field.enum_type.values)
        return {"type": "integer", "format": "int32",
                "description": f"enum {field.enum_type.full_name}: {values}"}
    return {"type": "string"}


class SchemaSet:
    """The component schemas of every message reachable from the methods added."""

    def __init__(self) -> None:
        self.schemas: dict[str, dict[str, Any]] = {}

    def name_of(self, message: Descriptor) -> str:
        return message.full_name

    def add(self, message: Descriptor) -> str:
        name = self.name_of(message)
        if name in self.schemas:
            return name
        self.schemas[name] = {}  # reserved first: messages may refer to themselves
        properties: dict[str, Any] = {}
        for field in message.fields:
            properties[field.name] = self._field_schema(field)
        self.schemas[name] = {
            "type": "object",
            "title": message.name,
            "properties": properties,
            "description": "Missing keys take their default; unknown keys are ignored.",
        }
        return name

    def _field_schema(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self._single(value)}
        single = self._single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        if field.message_type is not None or field.has_presence:
            # Absent message and `optional` fields are written as null.
            if "$ref" in single:
                return {"anyOf": [single, {"type": "null"}]}
            kinds = single.get("type")
            if isinstance(kinds, str):
                return single | {"type": [kinds, "null"]}
        return single

    def _single(self, field: FieldDescriptor) -> dict[str, Any]:
        if field.message_type is not None:
            if field.message_type.full_name == EMPTY:
                return {"type": "null"}
            return {"$ref": _ref(self.add(field.message_type))}
        return _scalar_schema(field)


def _body_schema(schemas: SchemaSet, message: Descriptor) -> dict[str, Any]:
    if message.full_name == EMPTY:
        return {"type": "null", "description": "google.protobuf.Empty: null (or {})"}
    return {"$ref": _ref(schemas.add(message))}


def _operations(schemas: SchemaSet, service: ServiceDescriptor, mount: str,
                tag: str) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method in service.methods:
        request = _body_schema(schemas, method.input_type)
        response = _body_schema(schemas, method.output_type)
        paths[f"{mount}/{method.name}"] = {
            "post": {
                "tags": [tag],
                "operationId": f"{tag}.{method.name}",
                "summary": f"{method.name}({method.input_type.name}) -> {method.output_type.name}",
                "description": (
                    f"`{service.full_name}.{method.name}`. JSON with `?json` or a JSON "
                    "content type, else protobuf binary. A GET with the request as the query "
                    "string works too."
                ),
                "requestBody": {"required": False,
                                "content": {"application/json": {"schema": request}}},
                "responses": {
                    "200": {"description": method.output_type.name,
                            "content": {"application/json": {"schema": response}}},
                    "default": {"description": "An error: 4xx for bad input, 5xx otherwise",
                                "content": {"application/json": {
                                    "schema": {"$ref": _ref("Error")}}}},
                },
            }
        }
    return paths


def _stream_paths() -> dict[str, Any]:
    """The two non-RPC routes the console uses (their query parameters are plain strings)."""

    def query(name: str, text: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "description": text,
                "schema": {"type": "string"}}

    return {
        "/logs": {"get": {
            "tags": ["Streams"], "operationId": "logs",
            "summary": "A VM's serial, stdout or stderr log, optionally followed",
            "parameters": [query("id", "VM id (required)"), query("ch", "serial|stdout|stderr"),
                           query("lines", "last N lines"), query("follow", "keep streaming"),
                           query("ansi", "keep terminal escapes")],
            "responses": {"200": {"description": "text/plain stream",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}}},
        }},
        "/events": {"get": {
            "tags": ["Streams"], "operationId": "events",
            "summary": "VM events as Server-Sent Events (resumable with Last-Event-ID)",
            "parameters": [query("id", "only these VMs (repeatable)"),
                           query("last_event_id", "resume after this id (0: whole history)"),
                           query("follow", "false: end after the history"),
                           query("heartbeat", "seconds between heartbeat comments")],
            "responses": {"200": {"description": "text/event-stream",
                                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}},
        }},
    }


@functools.cache
def openapi_document() -> dict[str, Any]:
    schemas = SchemaSet()
    paths = _operations(schemas, vmm_rpc_pb2.DESCRIPTOR.services_by_name["Vmm"], "/prpc", "Vmm")
    paths |= _operations(schemas, guest_api_pb2.DESCRIPTOR.services_by_name["ProxiedGuestApi"],
                         "/guest", "Guest")
    paths |= _stream_paths()
    components = dict(sorted(schemas.schemas.items())) | {"Error": ERROR_SCHEMA}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dstack VMM API (vmm)",
            "version": __version__,
            "description": (
                "Generated at run time from the proto descriptors. Field names are snake_case, "
                "bytes are hex, 64-bit integers are JSON numbers, absent optional and message "
                "fields are null."
            ),
        },
        "servers": [{"url": "."}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
        "paths": paths,
    }


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vmm API docs</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="swagger/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="swagger/swagger-ui-bundle.js"></script>
<script src="swagger/init.js"></script>
</body></html>
"""

# A file of its own (not inline) so a strict Content-Security-Policy can forbid inline scripts.
DOCS_INIT = """window.ui = SwaggerUIBundle({
  url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  validatorUrl: null, tryItOutEnabled: true,
  requestInterceptor: (req) => {
    const token = localStorage.getItem("vmm.token");
    if (token && !req.headers.Authorization) req.headers.Authorization = "Bearer " + token;
    return req;
  },
});
"""


def api_docs_routes() -> list[Route]:
    async def spec(request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def docs(request: Request) -> Response:
        return Response(DOCS_PAGE, media_type="text/html; charset=utf-8")

    async def init(request: Request) -> Response:
        return Response(DOCS_INIT, media_type="text/javascript; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        media_type = SWAGGER_FILES.get(name)
        if media_type is None:
            return JSONResponse({"error": f"no such file: {name}", "message": f"no such file: "
                                 f"{name}", "code": "NOT_FOUND"}, status_code=404)
        data = _swagger_file(name)
        return Response(data, media_type=media_type,
                        headers={"cache-control": "public, max-age=86400"})

    return [
        Route("/api-docs/openapi.json", spec, methods=["GET"]),
        Route("/api-docs/docs", docs, methods=["GET"]),
        Route("/api-docs/swagger/init.js", init, methods=["GET"]),
        Route("/api-docs/swagger/{name}", asset, methods=["GET"]),
    ]


@functools.cache
def _swagger_file(name: str) -> bytes:
    return (resources.files("vmm.api.console") / "swagger" / name).read_bytes()
