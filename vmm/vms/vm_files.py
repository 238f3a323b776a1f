"""A VM's configuration files on disk, as reconciliation sees them: stamped, watched, read.

- ``stamp``: (inode, size, mtime, ctime) of each file a VM's configuration is read from, and of
  the update journal. Every write, the daemon's atomic renames as an operator's in-place edit,
  changes it, so an equal stamp means nothing to re-read.
- ``watch_workdir``: the inotify watch (``vmm.core.inotify``) that tells, without a ``stat``,
  that a directory had no event on those files since it was last found unchanged.
- ``read_new``: a directory not yet loaded, stamped and read in one pass: two listings say which
  files exist (and whether an update left anything to finish), each present file is stamped by
  ``fstat`` on the descriptor it is then read from, and absent ones cost nothing. Start-up does
  this for every VM, in a worker thread.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from vmm.core.inotify import DirWatch
from vmm.model.manifest import DesiredState, Manifest
from vmm.model.workdir import SharedFiles, Workdir
from vmm.vms.update import JOURNAL, finish_pending

log = logging.getLogger(__name__)

Stamp = tuple[object, ...]
# The files a VM's configuration is read from, and the update journal (see vms.update).
_MANIFEST, _STATE = "vm-manifest.json", "vm-state.json"
_COMPOSE, _ENV, _USER = "shared/app-compose.json", "shared/.encrypted-env", "shared/.user-config"
_STAMPED = (_MANIFEST, _STATE, _COMPOSE, _ENV, _USER, JOURNAL)
# The entries whose events make a VM's directory worth stamping again: its stamped files and
# ``shared`` itself (in the VM's directory), and the stamped files in ``shared/``.
_WATCHED_NAMES = frozenset({*(name.rpartition("/")[2] for name in _STAMPED), "shared"})
_REMOVING = ".removing"


def stamp(workdir: Workdir) -> Stamp | None:
    """(inode, size, mtime, ctime) of each configuration file, None for an absent one.

    None for the whole stamp if the directory cannot be read. Taken before the files are read,
    so that a write racing the read shows as a change next time.
    """
    directory = str(workdir.path)
    found: list[object] = []
    for name in _STAMPED:
        try:
            # os.stat on a str: a Path per file costs more than the stat, 6,000 times a reload.
            st = os.stat(f"{directory}/{name}")  # noqa: PTH116
        except FileNotFoundError:
            found.append(None)
        except OSError:
            return None
        else:
            found.append((st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(found)


def watch_workdir(watch: DirWatch, workdir: Workdir) -> bool:
    """Watch a VM's directory and ``shared/`` for changes to what ``stamp`` covers."""
    directory = str(workdir.path)
    return watch.watch(workdir.id, (directory, f"{directory}/shared"), _WATCHED_NAMES)


def update_left(directory: str) -> bool:
    """Whether an update left a journal or staged files (``.<name>.update``) to deal with.

    Two directory listings (the ones ``read_new`` takes anyway) instead of ``finish_pending``'s
    five failing calls.
    """
    try:
        return _leftovers(*_listings(directory))
    except FileNotFoundError:
        return False


def _listings(directory: str) -> tuple[set[str], set[str]]:
    """The names in a VM's directory and in its ``shared/`` (empty if there is none)."""
    names = set(os.listdir(directory))  # noqa: PTH208 - names only, no Path per entry
    try:
        shared = set(os.listdir(f"{directory}/shared"))  # noqa: PTH208
    except FileNotFoundError:
        shared = set()
    return names, shared


def _leftovers(names: set[str], shared: set[str]) -> bool:
    return JOURNAL in names or any(
        n.startswith(".") and n.endswith(".update") for n in (*names, *shared))


@dataclass(frozen=True)
class Found:
    """A directory as ``read_new`` found it: the stamp taken as its files were read, and them."""

    stamp: Stamp | None
    manifest: Manifest
    desired: DesiredState
    shared: SharedFiles
    removing: bool
    names: frozenset[str]  # the directory's entries: what else there is to read, if anything


def read_new(workdir: Workdir) -> Found:
    """Finish a leftover update, then stamp and read the directory (see the module docstring).

    Raises what the ``Workdir`` readers raise: ``OSError`` (FileNotFoundError without a
    manifest) or ``ManifestError``.
    """
    directory = str(workdir.path)
    names, shared = _listings(directory)
    if _leftovers(names, shared):
        try:
            finish_pending(workdir)
        except OSError as exc:
            log.warning("cannot finish the interrupted update of %s: %s", directory, exc)
        names, shared = _listings(directory)
    present = names | {f"shared/{n}" for n in shared}
    stamps: list[object] = []
    contents: dict[str, bytes] = {}
    for name in _STAMPED:
        entry = None
        if name not in present:
            pass
        elif name == JOURNAL:  # not read, only stamped: an update still to finish
            try:
                st = os.stat(f"{directory}/{name}")  # noqa: PTH116
            except FileNotFoundError:
                pass
            else:
                entry = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        else:
            read = _read_stamped(f"{directory}/{name}")
            if read is not None:
                contents[name], entry = read
        stamps.append(entry)
    if _MANIFEST not in contents:
        raise FileNotFoundError(2, "No such file or directory", str(workdir.manifest))
    desired = contents.get(_STATE)
    return Found(
        stamp=tuple(stamps),
        manifest=Manifest.loads(contents[_MANIFEST]),
        desired=DesiredState(started=False) if desired is None else DesiredState.loads(desired),
        shared=SharedFiles(
            compose=contents.get(_COMPOSE, b"").decode(errors="replace"),
            encrypted_env=contents.get(_ENV, b""),
            user_config=contents.get(_USER, b"").decode(errors="replace"),
        ),
        removing=_REMOVING in names,
        names=frozenset(names),
    )


def _read_stamped(path: str) -> tuple[bytes, tuple[int, int, int, int]] | None:
    """A file's content and its stamp (``fstat`` before reading); None if it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
