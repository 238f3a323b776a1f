"""The daemon's log level: the one place that sets it, at start (``vmm serve``) and at run time.

``configure`` installs the handler once; ``set_level`` changes the level of the root logger and of
the loggers that follow it at a distance (httpx, kept at WARNING or above because it logs one line
per supervisor call; uvicorn's, which uvicorn pins to its own ``log_level`` at start). SetLogLevel
calls ``set_level``, so a level changed at run time applies to every module at once and lasts
until the next change or restart (vmm.toml's ``log_level`` is the level at start).
"""

from __future__ import annotations

import logging
from typing import Final

LEVELS: Final = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")


def configure(level: str) -> None:
    """Install the daemon's log handler and set the starting level."""
    logging.basicConfig(level=_number(level), format=FORMAT)
    set_level(level)


def set_level(level: str) -> None:
    """Apply ``level`` (one of ``LEVELS``) now; ValueError naming the levels otherwise."""
    number = _number(level)
    logging.getLogger().setLevel(number)
    logging.getLogger("httpx").setLevel(max(number, logging.WARNING))
    for name in _UVICORN_LOGGERS:
        logging.getLogger(name).setLevel(number)


def current_level() -> str:
    """The root logger's level, as its name in ``LEVELS`` (or Python's name for another)."""
    return logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()


def _number(level: str) -> int:
    if level not in LEVELS:
        raise ValueError(f"{level!r} is not a log level; use one of {', '.join(LEVELS)}")
    number: int = getattr(logging, level.upper())
    return number
