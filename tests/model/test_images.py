"""Image directories: metadata rules and what makes an image unusable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_image, populate_images
from vmm.core.exceptions import InvalidField, NotFound
from vmm.model.images import ImageError, ReportedProblems, list_images, load_image


def test_listing_skips_broken_images(tmp_path: Path) -> None:
    """Only loadable images are listed, sorted by name."""
    populate_images(tmp_path)
    assert [i.name for i in list_images(tmp_path)] == ["dstack-0.5.3", "dstack-dev-0.5.4"]


def _skipped(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The "skipping image" lines logged since the last call, then forgotten."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    caplog.clear()
    return lines


def test_a_broken_image_is_logged_once_until_its_problem_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A poll does not log a broken image again; a new reason, or a new breakage, does."""
    reported = ReportedProblems()
    make_image(tmp_path, "dstack-0.5.3", {"kernel": "k", "initrd": "i", "version": "0.5.3"})
    broken = make_image(tmp_path, "half", "{not json")
    caplog.set_level("WARNING", logger="vmm.model.images")
    list_images(tmp_path, reported)
    assert _skipped(caplog) == ["skipping image 'half': unreadable metadata.json: "
                                "Expecting property name enclosed in double quotes: "
                                "line 1 column 2 (char 1)"]
    for _ in range(3):
        assert [i.name for i in list_images(tmp_path, reported)] == ["dstack-0.5.3"]
    assert _skipped(caplog) == []
    (broken / "metadata.json").write_text(json.dumps({"kernel": "k", "initrd": "i",
                                                      "version": "0.4.0"}))
    list_images(tmp_path, reported)
    assert [line.split(":")[0] for line in _skipped(caplog)] == ["skipping image 'half'"]
    (broken / "metadata.json").write_text(json.dumps({"kernel": "k", "initrd": "i",
                                                      "version": "0.5.1"}))
    (broken / "k").write_bytes(b"k")
    (broken / "i").write_bytes(b"i")
    assert [i.name for i in list_images(tmp_path, reported)] == ["dstack-0.5.3", "half"]
    assert _skipped(caplog) == []
    (broken / "metadata.json").write_text(json.dumps({"kernel": "k", "initrd": "i",
                                                      "version": "0.4.0"}))
    list_images(tmp_path, reported)
    assert [line.split(":")[0] for line in _skipped(caplog)] == ["skipping image 'half'"]


def test_each_image_directory_keeps_its_own_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same broken entry in two image directories is logged for each; an unreadable
    directory is logged once per reason, not at every poll."""
    reported = ReportedProblems()
    caplog.set_level("WARNING", logger="vmm.model.images")
    for where in ("one", "two"):
        make_image(tmp_path / where, "half", "{not json")
        list_images(tmp_path / where, reported)
    assert len(_skipped(caplog)) == 2
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    for _ in range(3):
        assert list_images(not_a_directory, reported) == []
    unlistable = [r.getMessage() for r in caplog.records]
    assert len(unlistable) == 1
    assert unlistable[0].startswith(f"cannot list image directory {not_a_directory}: ")


def test_missing_directory_lists_nothing(tmp_path: Path) -> None:
    """A missing image directory is an empty list, not an error."""
    assert list_images(tmp_path / "none") == []


def test_paths_resolve_inside_the_image(tmp_path: Path) -> None:
    """Artifacts resolve to absolute files inside the image directory."""
    populate_images(tmp_path)
    image = load_image(tmp_path, "dstack-0.5.3")
    assert image.kernel == (tmp_path / "dstack-0.5.3" / "bzImage").resolve()
    assert image.rootfs is not None and image.rootfs.name == "rootfs.img.verity"
    assert image.hda is None
    assert image.shared_ro is True
    assert json.loads(image.description)["version"] == "0.5.3"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("broken-json", "unreadable metadata.json"),
        ("old-0.4.0", "unsupported image version"),
        ("escapes", "inside the image directory"),
        ("missing-kernel", "does not exist"),
    ],
)
def test_broken_images_say_why(tmp_path: Path, name: str, reason: str) -> None:
    """Each kind of broken image gives an error with the reason."""
    populate_images(tmp_path)
    with pytest.raises(ImageError, match=reason):
        load_image(tmp_path, name)


def test_unknown_image_and_bad_names(tmp_path: Path) -> None:
    """An unknown image is NotFound; traversal and odd characters are invalid names."""
    with pytest.raises(NotFound):
        load_image(tmp_path, "nope")
    for bad in ("", ".", "..", "a/b", "../x", "x" * 65, "a b"):
        with pytest.raises(InvalidField):
            load_image(tmp_path, bad)


def test_an_image_symlinked_from_outside_is_not_read(tmp_path: Path) -> None:
    """A symlink in the images dir that leads outside it is refused and skipped by the listing."""
    images = tmp_path / "images"
    populate_images(images)
    make_image(tmp_path, "elsewhere-0.5.0", {"kernel": "k", "initrd": "i", "version": "0.5.0"})
    (images / "planted").symlink_to(tmp_path / "elsewhere-0.5.0", target_is_directory=True)
    with pytest.raises(InvalidField, match="inside its directory"):
        load_image(images, "planted")
    assert [i.name for i in list_images(images)] == ["dstack-0.5.3", "dstack-dev-0.5.4"]


def test_iso_rootfs_is_refused(tmp_path: Path) -> None:
    """An ISO rootfs is refused for images >= 0.5.0."""
    metadata: dict[str, object] = {
        "kernel": "k", "initrd": "i", "rootfs": "r.iso", "version": "0.5.1"
    }
    make_image(tmp_path, "iso", metadata)
    with pytest.raises(ImageError, match="ISO"):
        load_image(tmp_path, "iso")
