"""The daemon's version and the git revision it was built from."""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

__version__ = "0.1.0"


@cache
def git_revision() -> str:
    """Return ``git:<sha>`` of the source tree, or ``unknown`` outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = result.stdout.strip()
    return f"git:{sha}" if result.returncode == 0 and sha else "unknown"
