"""guest_agent.identity: app id, instance id seed and instance id (reference §9)."""

import hashlib
import json
from pathlib import Path

from guest_agent import identity

COMPOSE = b'{"name": "id-test"}'


def share_with(tmp_path: Path, compose: bytes | None = COMPOSE, info: object = None) -> Path:
    share = tmp_path / "share"
    share.mkdir(parents=True)
    if compose is not None:
        (share / "app-compose.json").write_bytes(compose)
    if info is not None:
        (share / ".instance_info").write_text(json.dumps(info))
    return share


def test_app_id_defaults_to_the_compose_hash_prefix(tmp_path: Path) -> None:
    """Without .instance_info, app_id = sha256(app-compose.json)[:20]; id = sha256(seed||app_id)[:20]."""
    ident, problems = identity.compute(share_with(tmp_path), tmp_path / "state", tmp_path / "no-mid")
    assert problems == []
    assert ident.app_id == hashlib.sha256(COMPOSE).digest()[:20]
    assert ident.instance_id == hashlib.sha256(ident.seed + ident.app_id).digest()[:20]
    assert ident.device_id == hashlib.sha256(ident.seed).digest()
    assert json.loads(ident.instance_info()) == {
        "instance_id_seed": ident.seed.hex(),
        "instance_id": ident.instance_id.hex(),
        "app_id": ident.app_id.hex(),
    }


def test_instance_info_app_id_wins_and_bad_ones_fall_back(tmp_path: Path) -> None:
    """.instance_info's app_id (0x and case allowed) is used; a malformed one is reported and ignored."""
    app_id = "AB" * 20
    good, _ = identity.compute(share_with(tmp_path / "a", info={"app_id": "0x" + app_id}), tmp_path / "s1")
    assert good.app_id.hex() == app_id.lower()
    bad, problems = identity.compute(share_with(tmp_path / "b", info={"app_id": "abcd"}), tmp_path / "s2")
    assert bad.app_id == hashlib.sha256(COMPOSE).digest()[:20]
    assert any("not 20 bytes" in p for p in problems)


def test_seed_is_kept_on_disk_and_reused(tmp_path: Path) -> None:
    """The seed is made once, stored as hex, and the next boot's instance id is the same."""
    share = share_with(tmp_path)
    first, _ = identity.compute(share, tmp_path / "state")
    second, _ = identity.compute(share, tmp_path / "state")
    assert (tmp_path / "state" / identity.SEED_FILE).read_text().strip() == first.seed.hex()
    assert second.seed == first.seed and second.instance_id == first.instance_id
    other, _ = identity.compute(share, tmp_path / "fresh-disk")
    assert other.instance_id != first.instance_id


def test_no_instance_id_compose_gives_an_empty_instance_id(tmp_path: Path) -> None:
    """A compose with no_instance_id=true reports an empty instance id (the seed still exists)."""
    share = share_with(tmp_path, compose=b'{"no_instance_id": true}')
    ident, _ = identity.compute(share, tmp_path / "state")
    assert ident.instance_id == b""
    assert len(ident.seed) == 20
    assert json.loads(ident.instance_info())["instance_id"] == ""


def test_unwritable_state_dir_is_reported_not_fatal(tmp_path: Path) -> None:
    """If the seed cannot be stored, the boot still gets a seed and the problem is logged."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    ident, problems = identity.compute(share_with(tmp_path), blocker / "state")
    assert len(ident.seed) == 20
    assert any("cannot store" in p for p in problems)


def test_machine_id_gives_the_device_id(tmp_path: Path) -> None:
    """device_id is sha256 of /etc/machine-id when it is not empty."""
    mid = tmp_path / "machine-id"
    mid.write_text("0123456789abcdef0123456789abcdef\n")
    ident, _ = identity.compute(share_with(tmp_path), tmp_path / "state", mid)
    assert ident.device_id == hashlib.sha256(b"0123456789abcdef0123456789abcdef").digest()


def test_console_line_is_one_json_line_with_dstack_key_names(tmp_path: Path) -> None:
    """The console identity is one JSON line with dstack's AppInfo key names and hex ids."""
    share = share_with(tmp_path)
    ident, _ = identity.compute(share, tmp_path / "state", tmp_path / "no-mid")
    line = ident.console_line(hashlib.sha256(COMPOSE).hexdigest(), identity.app_name(share))
    assert "\n" not in line
    assert json.loads(line) == {
        "app_id": hashlib.sha256(COMPOSE).hexdigest()[:40],
        "app_name": "id-test",
        "compose_hash": hashlib.sha256(COMPOSE).hexdigest(),
        "instance_id": ident.instance_id.hex(),
        "device_id": ident.device_id.hex(),
    }


def test_console_line_without_compose_has_empty_fields(tmp_path: Path) -> None:
    """Without a compose the identity line still parses, with empty app name and compose hash."""
    share = share_with(tmp_path, compose=None)
    ident, _ = identity.compute(share, tmp_path / "state", tmp_path / "no-mid")
    doc = json.loads(ident.console_line(None, identity.app_name(share)))
    assert doc["compose_hash"] == "" and doc["app_name"] == "" and doc["app_id"] == ""
