"""Running ``vmm-cli`` as an operator does: a subprocess with its own HOME, against a daemon."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.daemon_proc import DaemonProcess, checkout_env, start_daemon
from tests.support.short_dirs import short_dir
from tests.support.vm_ops import idle_config, prepare_images

TOKEN = "cli-token"


def run_cli(*args: str, home: Path, env: dict[str, str] | None = None,
            stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m vmm.cli_client ARGS`` with HOME (config and KMS whitelist) set to ``home``.

    The DSTACK_VMM_* variables of the test's own environment never leak in.
    """
    base = {k: v for k, v in checkout_env().items() if not k.startswith("DSTACK_VMM_")}
    return subprocess.run(
        [sys.executable, "-m", "vmm.cli_client", *args],
        capture_output=True, text=True, timeout=timeout, check=False, input=stdin,
        env={**base, "HOME": str(home), **(env or {})},
    )


@contextmanager
def cli_daemon(kms_url: str = "", extra: str = "") -> Iterator[DaemonProcess]:
    """An idle-image daemon with auth on (TOKEN), a Unix socket and ``kms_url``."""
    with short_dir("vmmc") as workdir:
        prepare_images(workdir)
        # The idle guest ignores ACPI: a short shutdown_timeout keeps graceful stops quick.
        config = (f'kms_url = "{kms_url}"\n' if kms_url else "") + idle_config(
            cvm="shutdown_timeout = 2", extra=f'[auth]\nenabled = true\ntokens = ["{TOKEN}"]\n' + extra)
        daemon = start_daemon(workdir, addresses=["tcp:127.0.0.1:0", "unix:./vmm.sock"],
                              extra_config=config)
        try:
            yield daemon
        finally:
            daemon.destroy()
