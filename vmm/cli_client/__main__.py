import sys

from vmm.cli_client import main

sys.exit(main())
