"""``python -m vmm.supervisor --uds SOCK --pid-file FILE --log-file FILE [--state-file FILE]``.

``--detach`` is accepted for compatibility with dstack's launcher and does nothing: the launcher
(``ensure_supervisor``) already starts us in our own session with no terminal and stdio
redirected, which is all a double fork would buy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmm.supervisor.server import Options, run

STATE_FILE_NAME = "supervisor-state.json"


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m vmm.supervisor",
        description="Own the VM processes so they outlive the vmm daemon.",
    )
    parser.add_argument("--uds", type=Path, required=True, help="Unix socket to serve on")
    parser.add_argument("--pid-file", type=Path, required=True, help="where to write our pid")
    parser.add_argument("--log-file", type=Path, required=True, help="where to log")
    parser.add_argument(
        "--state-file",
        type=Path,
        help=f"the process table (default: {STATE_FILE_NAME} next to the pid file)",
    )
    parser.add_argument(
        "--detach", action="store_true", help="accepted for compatibility; always detached"
    )
    args = parser.parse_args(argv)
    pid_file: Path = args.pid_file.absolute()
    state_file: Path = (args.state_file or pid_file.with_name(STATE_FILE_NAME)).absolute()
    return Options(
        uds=args.uds.absolute(),
        pid_file=pid_file,
        log_file=args.log_file.absolute(),
        state_file=state_file,
    )


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
