"""The development guest image for tests: built once per machine, shared by test processes."""

import fcntl
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-guest-image"
CACHE_DIR = REPO / ".cache" / "guest-build"
BUILD_TIMEOUT = 15 * 60.0
IMAGES_DIR_ENV = "VMM_TEST_IMAGES_DIR"


def images_dir() -> Path:
    """Where test images live: $VMM_TEST_IMAGES_DIR, else the repository's .cache/images."""
    configured = os.environ.get(IMAGES_DIR_ENV)
    return Path(configured) if configured else REPO / ".cache" / "images"


def run_build(*args: str, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run scripts/build-guest-image in its own process group; kill the group on timeout."""
    proc = subprocess.Popen(
        [str(BUILD_SCRIPT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise RuntimeError(
            f"build-guest-image timed out after {timeout:.0f} s\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def ensure_guest_image() -> Path:
    """Build (or reuse) the development image and return its directory."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with (CACHE_DIR / "test-image.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_build("--images-dir", str(images_dir()), "--cache-dir", str(CACHE_DIR))
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"build-guest-image failed (rc={result.returncode})\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    image = Path(lines[-1])
    if not (image / "metadata.json").is_file():
        raise RuntimeError(f"build-guest-image printed {image}, which has no metadata.json")
    return image


def load_build_script() -> ModuleType:
    """Import scripts/build-guest-image (no .py suffix) as a module, for its helpers."""
    loader = importlib.machinery.SourceFileLoader("build_guest_image", str(BUILD_SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up while executing
    loader.exec_module(module)
    return module
