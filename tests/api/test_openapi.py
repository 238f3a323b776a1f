"""The API docs: an OpenAPI document generated from the descriptors, and an offline Swagger UI."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, cast

from openapi_spec_validator import validate

from tests.support.daemon_proc import DaemonProcess
from vmm.api.openapi import openapi_document
from vmm.rpc import guest_api_pb2, vmm_rpc_pb2


def schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = doc["components"]["schemas"][name]
    return found


def test_every_rpc_of_both_services_is_a_path() -> None:
    """Each Vmm method is POST /prpc/<Method> and each ProxiedGuestApi one POST /guest/<Method>."""
    paths = openapi_document()["paths"]
    for service, mount in (("Vmm", "/prpc"), ("ProxiedGuestApi", "/guest")):
        module = vmm_rpc_pb2 if service == "Vmm" else guest_api_pb2
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            assert "post" in paths[f"{mount}/{method.name}"], method.name
    assert {"/logs", "/events"} <= paths.keys()


def test_the_document_is_valid_openapi() -> None:
    """openapi-spec-validator accepts the generated document (OpenAPI 3.1)."""
    document: Mapping[Hashable, Any] = cast("Mapping[Hashable, Any]", openapi_document())
    validate(document)


def test_schemas_follow_dstacks_json_rules() -> None:
    """snake_case names, hex bytes, 64-bit ints as numbers, null for optional/message fields."""
    doc = openapi_document()
    config = schema(doc, "vmm.VmConfiguration")["properties"]
    assert "compose_file" in config and "disk_size" in config  # names as in the proto
    assert config["gpus"]["anyOf"][1] == {"type": "null"}  # a message field may be null
    pubkey = schema(doc, "vmm.PublicKeyResponse")["properties"]
    assert pubkey["public_key"]["type"] == "string" and "hex" in pubkey["public_key"]["description"]
    assert pubkey["timestamp"] == {"type": "integer", "format": "int64", "minimum": 0}
    status = doc["paths"]["/prpc/Status"]["post"]
    assert status["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/vmm.StatusResponse"}
    start = doc["paths"]["/prpc/StartVm"]["post"]["responses"]["200"]
    assert start["content"]["application/json"]["schema"]["type"] == "null"  # Empty is null
    info = schema(doc, "vmm.VmInfo")["properties"]
    assert info["instance_id"]["type"] == ["string", "null"]  # `optional string`


def test_the_daemon_serves_the_document_and_an_offline_swagger_ui(daemon: DaemonProcess) -> None:
    """/api-docs/openapi.json is the generated document; the UI's files come from the daemon."""
    with daemon.client() as client:
        assert client.get("/api-docs/openapi.json").json() == openapi_document()
        page = client.get("/api-docs/docs")
        assert page.status_code == 200 and "swagger-ui" in page.text
        assert "http" not in page.text  # every asset is relative: nothing from another host
        for asset in ("swagger/swagger-ui-bundle.js", "swagger/swagger-ui.css",
                      "swagger/init.js", "swagger/LICENSE"):
            assert client.get(f"/api-docs/{asset}").status_code == 200, asset
        assert client.get("/api-docs/swagger/package.json").status_code == 404  # only listed files
