"""Which directories may have changed since they were last checked: inotify, read when asked.

A ``DirWatch`` watches directories in groups named by a key (a VM's directory and its
``shared/``, say). The caller checks a key the slow way (``stat``, reading files), then
*settles* it; the key stays *clean* while no event names it. Events are not read as they come:
``poll`` drains the queue (non-blocking) when the caller is about to look, so a directory
written all day (a VM's serial log) costs nothing between looks, and entries outside a key's
``names`` are ignored.

Correctness never depends on inotify. A key is never clean if inotify is unavailable (no
``inotify_init1``, too many instances), its watch could not be added (the user's watch limit,
``max_watches``, a directory on a network filesystem whose remote writers raise no events), a
watch was lost (the directory deleted or moved: ``IN_IGNORED``, ``*_SELF``), or the queue
overflowed (``IN_Q_OVERFLOW``: every key). Not clean means "check it the slow way", which the
caller always can. Writes through a shared mapping raise no event; config files are not
written that way.

Epochs make this safe against races without holding a lock across the caller's check: each
``poll`` gets the next number, and an event counts for the poll that read it. ``settle(key, e)``
says "checked after poll ``e`` returned, with the watch in place". An event read by poll ``e``
or earlier happened before that check, so it is covered; one read later is not, and makes the
key dirty, whoever polled. The watch must be in place before the check (``watch`` first).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from collections.abc import Collection, Iterable, Sequence

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
# Everything that changes an entry's content, metadata (ctime) or existence, or the directory's.
_MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
         | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name
_READ_SIZE = 64 * 1024
# Reads per poll (the kernel queues ~16,000 events, a few reads' worth). A poll that stops
# before the queue is empty counts as an overflow: an event left unread would let a key that
# changed before the poll pass for clean.
_MAX_READS = 64
# statfs f_type of filesystems where another host may write without this kernel's knowledge.
_REMOTE_FILESYSTEMS = frozenset({
    0x6969,  # NFS
    0x517B, 0xFF534D42, 0xFE534D42,  # SMB, CIFS, SMB2
    0x65735546,  # FUSE (sshfs and the like)
    0x00C36400,  # Ceph
    0x01021997,  # 9p
    0x5346414F,  # AFS
    0x0BD00BD0,  # Lustre
    0x01161970,  # GFS2
    0x7461636F,  # OCFS2
})


class _Libc:
    def __init__(self) -> None:
        lib = ctypes.CDLL(None, use_errno=True)
        self.init1 = lib.inotify_init1
        self.init1.argtypes, self.init1.restype = [ctypes.c_int], ctypes.c_int
        self.add_watch = lib.inotify_add_watch
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int
        self.rm_watch = lib.inotify_rm_watch
        self.rm_watch.argtypes, self.rm_watch.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        self.statfs = lib.statfs
        self.statfs.argtypes, self.statfs.restype = [ctypes.c_char_p, ctypes.c_void_p], ctypes.c_int


def _load_libc() -> _Libc | None:
    try:
        return _Libc()
    except (OSError, AttributeError):  # not Linux, or a libc without inotify
        return None


class DirWatch:
    """Keys of directories, and whether anything happened in them since they were settled.

    Thread-safe: ``poll``, ``watch`` and ``dirty_among`` may run in worker threads.
    ``max_watches`` caps the kernel watches this object holds (the user's limit applies too).
    """

    def __init__(self, *, max_watches: int = 1 << 20, enabled: bool = True) -> None:
        self._max_watches = max_watches
        self._enabled = enabled
        self._libc: _Libc | None = None
        self._fd: int | None = None  # opened at first use; -1: unavailable
        self._lock = threading.Lock()
        self._epoch = 0
        self._overflow_at = 0  # the last poll that found events lost
        self._keys_of: dict[int, set[str]] = {}  # watch descriptor -> keys
        self._names_of: dict[int, frozenset[bytes] | None] = {}  # wd -> entry names that count
        self._wds: dict[str, set[int]] = {}  # key -> its live watches
        self._covered: set[str] = set()  # keys whose directories are all watched
        self._event_at: dict[str, int] = {}  # key -> the last poll that read an event for it
        self._settled: dict[str, int] = {}  # key -> the poll its last check followed

    @property
    def available(self) -> bool:
        with self._lock:
            return self._open() >= 0

    @property
    def watches(self) -> int:
        """How many kernel watches this object holds."""
        with self._lock:
            return len(self._keys_of)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = -1
            self._libc = _load_libc() if self._enabled else None
            if self._libc is not None:
                self._fd = self._libc.init1(os.O_NONBLOCK | os.O_CLOEXEC)
        return self._fd

    def poll(self) -> int:
        """Read the pending events; return this poll's epoch (for ``settle``)."""
        with self._lock:
            self._epoch += 1
            fd = self._open()
            if fd < 0:
                return self._epoch
            for _ in range(_MAX_READS):
                try:
                    data = os.read(fd, _READ_SIZE)
                except BlockingIOError:
                    break  # drained
                except OSError:
                    self._overflow_at = self._epoch  # cannot tell what was lost
                    break
                self._parse(data)
            else:
                self._overflow_at = self._epoch  # events keep coming: treat as lost
            return self._epoch

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            name = data[start:start + length].rstrip(b"\0")
            offset = start + length
            if mask & IN_Q_OVERFLOW:
                self._overflow_at = self._epoch
                continue
            keys = self._keys_of.get(wd)
            if not keys:
                continue  # a watch already released
            if mask & IN_IGNORED:  # the kernel dropped the watch: its keys are not covered
                del self._keys_of[wd]
                self._names_of.pop(wd, None)
                for key in keys:
                    self._wds.get(key, set()).discard(wd)
                    self._covered.discard(key)
            elif name and (names := self._names_of.get(wd)) is not None and name not in names:
                continue
            for key in keys:
                self._event_at[key] = self._epoch

    def watch(self, key: str, directories: Sequence[str],
              names: Collection[str] | None = None) -> bool:
        """Watch ``key``'s directories (again: a replaced directory is watched anew).

        Directories after the first must be children of it that ``names`` lists: one that does
        not exist is fine, since its creation is an event in the first. Only events on entries
        in ``names`` count (``None``: every entry); events on a directory itself always do.
        False if the key cannot be watched: it stays dirty (check it the slow way).
        """
        with self._lock:
            fd = self._open()
            libc = self._libc
            if fd < 0 or libc is None or not directories or _remote(libc, directories[0]):
                self._unwatch(key)
                return False
            wanted = frozenset(map(os.fsencode, names)) if names is not None else None
            found: set[int] = set()
            for index, directory in enumerate(directories):
                wd = libc.add_watch(fd, os.fsencode(directory), _MASK)
                if wd < 0:
                    if index > 0 and ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR):
                        continue
                    self._unwatch(key)
                    return False
                if wd not in self._keys_of and len(self._keys_of) >= self._max_watches:
                    libc.rm_watch(fd, wd)
                    self._unwatch(key)
                    return False
                self._keys_of.setdefault(wd, set()).add(key)
                self._names_of[wd] = wanted
                self._wds.setdefault(key, set()).add(wd)
                found.add(wd)
            for stale in self._wds[key] - found:  # the directories it watched were replaced
                self._release(key, stale)
            self._covered.add(key)
            return True

    def settle(self, key: str, epoch: int) -> None:
        """``key`` was checked after poll ``epoch`` returned, with its watch in place."""
        with self._lock:
            if key in self._covered:
                self._settled[key] = epoch

    def is_clean(self, key: str) -> bool:
        with self._lock:
            return self._clean(key)

    def dirty_among(self, keys: Iterable[str]) -> list[str]:
        """The keys not clean, in order: to check the slow way."""
        with self._lock:
            return [key for key in keys if not self._clean(key)]

    def _clean(self, key: str) -> bool:
        settled = self._settled.get(key)
        return (settled is not None and key in self._covered and self._overflow_at <= settled
                and self._event_at.get(key, 0) <= settled)

    def forget(self, key: str) -> None:
        with self._lock:
            self._unwatch(key)
            self._event_at.pop(key, None)

    def retain(self, keys: Collection[str]) -> None:
        """Forget every key not in ``keys`` (their watches are removed)."""
        with self._lock:
            for table in (self._wds, self._event_at, self._settled):
                for key in [k for k in table if k not in keys]:
                    self._unwatch(key)
                    self._event_at.pop(key, None)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None and self._fd >= 0:
                os.close(self._fd)
            self._fd = -1
            self._keys_of.clear()
            self._names_of.clear()
            self._wds.clear()
            self._covered.clear()

    def _unwatch(self, key: str) -> None:
        """Release ``key``'s watches: it is not clean until watched and settled again."""
        for wd in list(self._wds.get(key, ())):
            self._release(key, wd)
        self._wds.pop(key, None)
        self._covered.discard(key)
        self._settled.pop(key, None)

    def _release(self, key: str, wd: int) -> None:
        self._wds.get(key, set()).discard(wd)
        keys = self._keys_of.get(wd)
        if keys is None:
            return
        keys.discard(key)
        if not keys:  # nobody else watches this directory
            del self._keys_of[wd]
            self._names_of.pop(wd, None)
            if self._libc is not None and self._fd is not None and self._fd >= 0:
                self._libc.rm_watch(self._fd, wd)


def _remote(libc: _Libc, path: str) -> bool:
    """Whether ``path`` is on a filesystem that other hosts may write to (or cannot be told)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type (a long) comes first
    if libc.statfs(os.fsencode(path), buf) != 0:
        return True
    return ctypes.c_long.from_buffer(buf).value in _REMOTE_FILESYSTEMS
