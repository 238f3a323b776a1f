"""``vmm-cli``: drive a VMM daemon from the shell (commands and flags follow dstack's vmm-cli).

    vmm-cli [--url URL] [--token T | --auth-user U --auth-password P] COMMAND ...

The URL is ``http(s)://host:port`` or ``unix:/path/to/vmm.sock``. Flags win over the
environment (``DSTACK_VMM_URL``, ``DSTACK_VMM_TOKEN``, ``DSTACK_VMM_AUTH_USER``,
``DSTACK_VMM_AUTH_PASSWORD``), which wins over ``~/.dstack-vmm/config.json``; the default URL is
``http://127.0.0.1:9080``. Calls are ``POST /prpc/<Method>?json``. A failed call prints the
daemon's message and exits 1.

Commands live in modules by concern; each has ``register(subparsers)`` and sets ``run`` on its
parsers (``run(client, args)``). To add a command, add its module to ``COMMANDS`` in main.py.
"""
