"""atomic_write from many threads at once: every write lands whole, none fails, no scratch left."""

from __future__ import annotations

import threading
from pathlib import Path

from vmm.core.fsutil import atomic_write


def test_concurrent_atomic_writes_of_one_file_all_succeed_and_one_wins_whole(
    tmp_path: Path,
) -> None:
    """Threads replacing the same file together: no error, a whole content, no scratch file."""
    target = tmp_path / "vm-state.json"
    written = {f'{{"writer": {n}, "pad": "{"x" * 64}"}}'.encode() for n in range(8)}
    errors: list[BaseException] = []
    start = threading.Barrier(len(written))

    def writer(data: bytes) -> None:
        start.wait(timeout=30)
        try:
            for _ in range(100):
                atomic_write(target, data)
        except BaseException as exc:  # reported below, on the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(data,)) for data in written]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert target.read_bytes() in written
    assert [p.name for p in tmp_path.iterdir()] == ["vm-state.json"]
