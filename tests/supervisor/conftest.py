"""Fixtures shared by the supervisor tests: the async backend and a short socket directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.short_dirs import short_dir
from tests.support.supervisor_proc import SupervisorPaths


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def paths() -> Iterator[SupervisorPaths]:
    with short_dir() as root:
        yield SupervisorPaths.in_dir(root)
