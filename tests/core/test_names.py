"""The one name rule for anything that becomes a path (vmm/names.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmm.core.exceptions import InvalidField
from vmm.core.names import IFNAME, IMAGE_NAME, VM_ID, check_name, child_of, is_valid_name


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "is required"),
        (".", "is not a name"),
        ("..", "is not a name"),
        ("a/b", "path separator"),
        ("a/../b", "path separator"),
        ("/etc", "path separator"),
        ("a\\b", "path separator"),
        ("a\nb", "control character"),
        ("a\rb", "control character"),
        ("a\0b", "control character"),
        ("x" * 65, "longer than 64"),
        ("a b", "outside A-Z a-z 0-9 _ . -"),
        ("\ud800", "outside A-Z a-z 0-9 _ . -"),
        ("é", "outside A-Z a-z 0-9 _ . -"),
    ],
)
def test_bad_image_names_are_refused_naming_the_field(name: str, reason: str) -> None:
    """Every name that is not one plain path component is an InvalidField naming the field."""
    with pytest.raises(InvalidField) as info:
        check_name(name, "image", IMAGE_NAME)
    assert info.value.field == "image"
    assert reason in info.value.reason
    assert info.value.status_code == 400


@pytest.mark.parametrize("name", ["dstack-0.5.3", "a", "A_b-c.d", ".hidden", "x" * 64])
def test_plain_image_names_pass(name: str) -> None:
    """Ordinary image names, dots included, are accepted unchanged."""
    assert check_name(name, "image", IMAGE_NAME) == name


def test_vm_ids_allow_no_dots_and_ifnames_at_most_15() -> None:
    """Each rule keeps its own character set and length."""
    assert is_valid_name("0f6c3c1e-8a2b-4c5d-9e0f-112233445566", VM_ID)
    assert not is_valid_name("a.b", VM_ID)
    assert is_valid_name("br-" + "x" * 12, IFNAME)
    assert not is_valid_name("br-" + "x" * 13, IFNAME)


def test_a_long_name_is_shown_shortened() -> None:
    """An over-long name is cut in the message, so an error never echoes megabytes."""
    with pytest.raises(InvalidField) as info:
        check_name("x" * 100_000, "id")
    assert len(info.value.message) < 200


def test_child_of_returns_the_entry_inside_the_root(tmp_path: Path) -> None:
    """A plain name (existing or not) becomes root/name."""
    (tmp_path / "img").mkdir()
    assert child_of(tmp_path, "img", "id", IMAGE_NAME) == tmp_path / "img"
    assert child_of(tmp_path, "new", "id", IMAGE_NAME) == tmp_path / "new"


def test_child_of_refuses_a_symlink_that_leads_outside(tmp_path: Path) -> None:
    """A symlink planted in the root that points elsewhere is refused, not followed."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "up").symlink_to("..", target_is_directory=True)
    for name in ("link", "up"):
        with pytest.raises(InvalidField, match="inside its directory") as info:
            child_of(root, name, "id", IMAGE_NAME)
        assert info.value.field == "id"


def test_child_of_checks_the_name_first(tmp_path: Path) -> None:
    """'.' and '..' never reach the path check: they are not names at all."""
    for name in (".", "..", "a/../b"):
        with pytest.raises(InvalidField):
            child_of(tmp_path, name, "id", IMAGE_NAME)


def test_child_of_refuses_a_symlink_loop(tmp_path: Path) -> None:
    """A symlink loop in the root is an InvalidField, not Python's RuntimeError (a 500)."""
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(InvalidField, match="cannot be resolved") as info:
        child_of(tmp_path, "loop", "id", IMAGE_NAME)
    assert info.value.field == "id"
