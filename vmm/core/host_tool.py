"""Run a host tool (ip, nft, qemu-img) to completion, within a deadline, from the event loop."""

from __future__ import annotations

import asyncio


async def run_host_tool(argv: list[str], timeout: float, *, stdin: bytes | None = None,
                        merge_output: bool = False) -> tuple[int, bytes]:
    """(exit status, stderr) of ``argv`` fed ``stdin``; its stdout too with ``merge_output``.

    Raises TimeoutError after ``timeout`` seconds, once the tool is killed and reaped: a tool
    that hangs must neither hold the caller nor be left behind as a zombie.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE if merge_output else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.STDOUT if merge_output else asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate(stdin)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, stdout if merge_output else stderr
