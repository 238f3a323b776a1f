"""A state directory and config for tests that run the registry in-process (real supervisor)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import populate_images
from tests.support.daemon_proc import kill_vm_processes
from tests.support.short_dirs import short_dir
from vmm.core.config import Config, ImageConfig, SupervisorConfig


@contextlib.contextmanager
def state_dir(prefix: str) -> Iterator[Path]:
    """A short temp dir; whatever the supervisor started under it is ended by PID afterwards."""
    with short_dir(prefix) as path:
        try:
            yield path
        finally:
            kill_vm_processes(path)


def in_process_config(state: Path, **fields: Any) -> Config:
    """Every path under ``state`` (images populated once), plus ``fields`` of Config."""
    if not (state / "images").exists():
        populate_images(state / "images")
    run = state / "run"
    return Config(
        run_path=str(state / "vm"),
        image=ImageConfig(path=str(state / "images")),
        supervisor=SupervisorConfig(
            sock=str(run / "supervisor.sock"), pid_file=str(run / "supervisor.pid"),
            log_file=str(run / "supervisor.log"), state_file=str(run / "supervisor-state.json"),
        ),
        **fields,
    )
