"""guest_agent.service: the JSON status endpoint on TCP 8080."""

import json
import urllib.error
import urllib.request

import pytest

from guest_agent import service


def test_get_root_returns_status_json_and_other_paths_404() -> None:
    """GET / answers the status document as JSON; any other path is a JSON 404."""
    server = service.start(lambda: {"service": "vmm-guest", "uptime": 1.5}, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.port}"
        with urllib.request.urlopen(base + "/", timeout=10) as response:
            assert response.headers["Content-Type"] == "application/json"
            assert json.loads(response.read()) == {"service": "vmm-guest", "uptime": 1.5}
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/nope", timeout=10)
        assert info.value.code == 404
        assert json.loads(info.value.read())["error"] == "not found"
        info.value.close()
    finally:
        server.shutdown()
        server.server_close()
