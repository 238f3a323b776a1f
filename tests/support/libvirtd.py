"""A private libvirtd for tests: its own config and state, ended by PID, the host left as it was.

The system libvirtd reads fixed paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt). The test daemon runs in a private mount namespace
(``unshare -m``) where a temp directory is bind-mounted over each of them, so nothing it writes
reaches the host. Where one of those directories does not exist on the host, its parent is
overlaid inside the namespace (upper layer in the temp directory) so the mount point can be made
without creating it on the host. The control socket lives in a test-owned directory outside
those mounts (``unix_sock_dir``) and is reached as ``qemu+unix:///system?socket=...``.

``wrap`` runs it inside a test's network namespace (``ip netns exec NS``, which execs, so the
PID stays libvirtd's): the TAPs libvirt makes for bridge NICs then land on that namespace's
bridge, and its QEMUs share the namespace.

qemu.conf choices, each for a measured reason (reference networking-libvirt.md §4):

- ``user``/``group = "root"``: with /dev/kvm present but unusable, defineXML otherwise takes 64 s.
- ``stdio_handler = "file"``: QEMU writes the serial ``<log file>`` itself, as under the QEMU
  backend; the default ("logd") needs a virtlogd, which nothing starts here, and virtlogd would
  rotate serial.log on its own schedule.
- ``security_driver = "none"``, ``dynamic_ownership = 0``, ``remember_owner = 0``: no relabelling
  or xattrs on the shared test image files.
- No cgroups: the namespace unmounts every cgroup hierarchy, so libvirt finds none and makes no
  machine/ directories under the host's /sys/fs/cgroup. (``cgroup_controllers = []`` is not
  enough: libvirt 9.0 then starts QEMU but, after a restart, fails to reconnect to it
  ("At least one cgroup controller is required") and kills it.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.short_dirs import short_dir

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
HOST_DIRS = ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
             "/var/log/libvirt")  # fmt: skip

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
"""

# Runs inside the new mount namespace: $1 is the temp root, the rest is libvirtd's argv.
_NAMESPACE_SETUP = r"""
set -eu
root=$1; shift
mount --make-rprivate /
# Hide the cgroup hierarchies: libvirt then runs QEMU without cgroups (see the module docstring).
awk '$3 == "cgroup" || $3 == "cgroup2" {print $2}' /proc/self/mounts | sort -r | while read -r mnt; do
  umount "$mnt"
done
# Each namespace (each start) overlays afresh: a restart must not find the old layers and skip
# its mounts, or the mkdir below would reach the host.
overlaid=" "
for dir in /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
  if [ ! -d "$dir" ]; then
    parent=$(dirname "$dir")
    case "$overlaid" in *" $parent "*) ;; *)
      layer="$root/overlay/$$$(echo "$parent" | tr / _)"
      mkdir -p "$layer/upper" "$layer/work"
      mount -t overlay overlay -o "lowerdir=$parent,upperdir=$layer/upper,workdir=$layer/work" "$parent"
      overlaid="$overlaid$parent "
    esac
    mkdir -p "$dir"
  fi
  mount --bind "$root/fs$dir" "$dir"
done
mount --bind "$root/passwd" /etc/passwd
mount --bind "$root/group" /etc/group
exec "$@"
"""


class Libvirtd:
    """One private libvirtd over a temp root; ``restart`` keeps the root (and its domains)."""

    def __init__(self, root: Path, wrap: Sequence[str] = ()) -> None:
        self.root = root
        self.wrap = tuple(wrap)
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = write_config(root)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.root / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.root / "fs" / "var" / "log" / "libvirt" / "libvirtd.log"

    @property
    def qemu_run_dir(self) -> Path:
        """/run/libvirt/qemu as seen from outside the namespace: domain pid files live here."""
        return self.root / "fs" / "run" / "libvirt" / "qemu"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no libvirtd log)"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.socket.unlink(missing_ok=True)
        argv = [*self.wrap, "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                _NAMESPACE_SETUP, "sh", str(self.root),
                "libvirtd", "--config", str(self.conf),
                "--pid-file", str(self.root / "libvirtd.pid")]  # fmt: skip
        with (self.root / "stderr").open("ab") as err:
            # The wrap, unshare and sh exec into libvirtd: this pid is libvirtd's own.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                stderr = (self.root / "stderr").read_text(errors="replace")
                raise RuntimeError(f"libvirtd exited with {self.proc.returncode}:\n{stderr}\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"libvirtd made no socket within {timeout:g} s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """End libvirtd by PID (SIGTERM, then SIGKILL); its QEMUs keep running, as in production."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill_qemus(self) -> None:
        """SIGKILL every QEMU this daemon started (by the pids in its run directory)."""
        pids = _qemu_pids(self.qemu_run_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def private_libvirtd(timeout: float = START_TIMEOUT, wrap: Sequence[str] = ()) -> Iterator[Libvirtd]:
    """Start a libvirtd of our own; end it and every QEMU it started by PID, whatever happens."""
    with short_dir("lvd") as root:
        daemon = Libvirtd(root, wrap)
        try:
            daemon.start(timeout)
            yield daemon
        finally:
            try:
                daemon.stop()
            finally:
                daemon.kill_qemus()


def write_config(root: Path) -> Path:
    for host_dir in HOST_DIRS:
        (root / "fs" / host_dir.lstrip("/")).mkdir(parents=True)
    (root / "sock").mkdir()
    etc = root / "fs" / "etc" / "libvirt"
    conf = etc / "libvirtd.conf"
    conf.write_text(
        f'unix_sock_dir = "{root / "sock"}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'unix_sock_ro_perms = "0700"\n'
        'auth_unix_ro = "none"\n'
        'auth_unix_rw = "none"\n'
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n'
    )
    (etc / "qemu.conf").write_text(QEMU_CONF)
    _with_qemu_account(root)
    return conf


def _with_qemu_account(root: Path) -> None:
    """Copies of /etc/passwd and /etc/group that know Debian's compiled-in QEMU account.

    libvirtd resolves ``libvirt-qemu`` before it reads qemu.conf and refuses to start without
    it; the account is made by libvirt-daemon-system, which these machines do not install.
    """
    for name, line in (
        ("passwd", "libvirt-qemu:x:64055:64055::/nonexistent:/usr/sbin/nologin"),
        ("group", "libvirt-qemu:x:64055:"),
    ):
        text = Path("/etc", name).read_text()
        if not any(entry.startswith("libvirt-qemu:") for entry in text.splitlines()):
            text = text.rstrip("\n") + "\n" + line + "\n"
        (root / name).write_text(text)


def _qemu_pids(run_dir: Path) -> set[int]:
    pids = set()
    for pid_file in run_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        # QEMU names its pid file by the path inside the namespace.
        if b"qemu-system" in cmdline and f"/run/libvirt/qemu/{pid_file.name}".encode() in cmdline:
            pids.add(pid)
    return pids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
