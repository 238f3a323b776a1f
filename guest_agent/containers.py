"""GuestApi.ListContainers: the Docker Engine's container list, when a Docker daemon runs."""

import json
from pathlib import Path

from guest_agent import httpclient

DOCKER_SOCKET = Path("/var/run/docker.sock")


class DockerError(Exception):
    pass


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def map_container(item: dict[str, object]) -> dict[str, object]:
    names = item.get("Names")
    created = item.get("Created")
    return {
        "id": _str(item.get("Id")),
        "names": [n for n in names if isinstance(n, str)] if isinstance(names, list) else [],
        "image": _str(item.get("Image")),
        "image_id": _str(item.get("ImageID")),
        "created": created if isinstance(created, int) else 0,
        "state": _str(item.get("State")),
        "status": _str(item.get("Status")),
    }


def list_containers(socket_path: Path = DOCKER_SOCKET, timeout: float = 10.0) -> dict[str, object]:
    """``{"containers": [...]}``; empty without a Docker socket, DockerError if Docker fails."""
    if not socket_path.exists():
        return {"containers": []}
    try:
        status, _ctype, body = httpclient.request(
            httpclient.unix_connector(str(socket_path)),
            "GET",
            "/containers/json?all=1",
            timeout=timeout,
            host="docker",
        )
    except OSError as exc:
        raise DockerError(f"docker at {socket_path}: {exc}") from None
    if status != 200:
        raise DockerError(f"docker answered HTTP {status}: {body[:200].decode(errors='replace')}")
    try:
        items = json.loads(body)
    except ValueError as exc:
        raise DockerError(f"docker sent invalid JSON: {exc}") from None
    if not isinstance(items, list):
        raise DockerError("docker sent a non-list container listing")
    return {"containers": [map_container(item) for item in items if isinstance(item, dict)]}
