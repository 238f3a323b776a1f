from __future__ import annotations

from typing import Any

import pytest

from vmm.supervisor.types import ProcessConfig, ProcessInfo, ProcessState


def config_json(**overrides: object) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "vm1",
        "name": "one",
        "command": "/usr/bin/qemu-system-x86_64",
        "args": ["-m", "512M"],
        "env": {"A": "b"},
        "cwd": "/var/lib/vm1",
        "stdout": "/var/lib/vm1/stdout.log",
        "stderr": "/var/lib/vm1/stderr.log",
        "pidfile": "/var/lib/vm1/qemu.pid",
        "cid": 3,
        "note": '{"kind":"cvm"}',
    }
    doc.update(overrides)
    return doc


def test_config_round_trips() -> None:
    """A ProcessConfig survives to_json/from_json unchanged."""
    config = ProcessConfig.from_json(config_json())
    assert ProcessConfig.from_json(config.to_json()) == config
    assert config.to_json() == config_json()


def test_config_cid_may_be_absent() -> None:
    """An absent cid reads as None, like an Option field in dstack's serde types."""
    doc = config_json()
    del doc["cid"]
    assert ProcessConfig.from_json(doc).cid is None


@pytest.mark.parametrize("missing", ["id", "command", "args", "env", "stdout", "pidfile", "note"])
def test_config_missing_field_is_named(missing: str) -> None:
    """A missing required field is rejected with its name in the message."""
    doc = config_json()
    del doc[missing]
    with pytest.raises(ValueError, match=f"missing field `{missing}`"):
        ProcessConfig.from_json(doc)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", 7),
        ("args", "-m 512M"),
        ("args", ["-m", 512]),
        ("env", {"A": 1}),
        ("cid", True),
        ("cid", -1),
        ("cid", 2**32),
    ],
)
def test_config_wrong_type_is_named(field: str, value: object) -> None:
    """A field of the wrong type or range is rejected with its name in the message."""
    with pytest.raises(ValueError, match=f"`{field}`"):
        ProcessConfig.from_json(config_json(**{field: value}))


def test_config_body_must_be_an_object() -> None:
    """A JSON array or string is not a config."""
    with pytest.raises(ValueError, match="must be a JSON object"):
        ProcessConfig.from_json(["id"])


def test_info_round_trips_and_names_nested_fields() -> None:
    """ProcessInfo round-trips, and an error inside it names the nested path."""
    state = ProcessState(
        status="exited", started=True, exit_code=3, pid=42, started_at=1.5, stopped_at=2.0
    )
    info = ProcessInfo(config=ProcessConfig.from_json(config_json()), state=state)
    assert ProcessInfo.from_json(info.to_json()) == info
    doc = info.to_json()
    doc["state"]["status"] = {"exited": 3}
    with pytest.raises(ValueError, match=r"`state\.status`"):
        ProcessInfo.from_json(doc)
    doc = info.to_json()
    del doc["config"]["name"]
    with pytest.raises(ValueError, match=r"missing field `config\.name`"):
        ProcessInfo.from_json(doc)


def test_state_integer_times_are_floats() -> None:
    """Whole-second times from JSON integers read back as floats; booleans are not pids."""
    doc = ProcessState(status="running", started=True, pid=1).to_json()
    doc["started_at"] = 10
    assert ProcessState.from_json(doc).started_at == 10.0
    doc["pid"] = True
    with pytest.raises(ValueError, match="`pid`"):
        ProcessState.from_json(doc)
