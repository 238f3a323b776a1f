import sys

from vmm.cli_client.main import main

sys.exit(main())
