"""The former home of ``vmm-cli``; kept so ``python -m vmm.client_cli`` and old imports work."""

import sys

from vmm.cli_client.main import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
