"""A minimal async QMP client: enough to press the power button and ask QEMU questions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from vmm.core.exceptions import Unavailable

TIMEOUT = 5.0


async def qmp_execute(
    socket_path: Path, command: str, arguments: dict[str, Any] | None = None,
    deadline: float = TIMEOUT,
) -> Any:
    """Connect, negotiate, run one command and return its ``return`` value."""
    try:
        return await asyncio.wait_for(_execute(socket_path, command, arguments), deadline)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, json.JSONDecodeError) as exc:
        raise Unavailable(f"QMP {command} on {socket_path} failed: {exc!r}") from None


async def _execute(socket_path: Path, command: str, arguments: dict[str, Any] | None) -> Any:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        await _read_message(reader)  # greeting
        await _call(reader, writer, "qmp_capabilities", None)
        return await _call(reader, writer, command, arguments)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _call(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: str,
    arguments: dict[str, Any] | None,
) -> Any:
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()
    while True:
        reply = await _read_message(reader)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise Unavailable(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        # Anything else is an asynchronous event; keep reading for our reply.


async def _read_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await reader.readline()
    if not line:
        raise asyncio.IncompleteReadError(b"", None)
    value = json.loads(line)
    if not isinstance(value, dict):
        raise json.JSONDecodeError("QMP message is not an object", line.decode(), 0)
    return value
