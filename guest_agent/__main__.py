"""Entry point: ``python3 -m guest_agent``."""

from guest_agent.agent import main

raise SystemExit(main())
