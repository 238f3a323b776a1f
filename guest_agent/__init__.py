"""In-guest agent of the vmm development image (standard library only).

It runs inside the guest as a child of the image's init (and on a host, for tests). It mounts
the host share, works out the instance id (identity.py), reports boot to the VMM's host API
(host_api.py) and to the serial console, serves the GuestApi (Info, SysInfo, NetworkInfo,
ListContainers, Shutdown; guest_api.py), a small HTTP status endpoint on TCP 8080, and powers
the VM off on Shutdown or the ACPI power button.

Channels (api_server.py, host_api.py, channel.py):

- GuestApi over HTTP/1.1 on vsock port 8000 when the guest has a vsock CID, and on TCP with
  ``--api-tcp HOST:PORT``; over frames (framing.py) on the virtio-serial port
  ``org.vmm.guest-agent``.
- HostApi over HTTP to ``host_api_url`` (vsock) when the guest has a vsock CID, else over frames
  on the virtio-serial port ``org.vmm.host-api``, else not at all.
- Ports are found by name under /sys/class/virtio-ports. ``--agent-port`` and
  ``--host-api-port`` name a path instead: a Unix socket is connected to, anything else is
  opened read-write.

Host-run options: ``--no-mount --no-power-button --no-poweroff --no-vsock``, ``--state-dir``
(instance id seed; default /var/lib/vmm-guest), ``--run-dir`` (once-per-boot record; default
/run/vmm-guest), ``--docker-socket``. See ``python -m guest_agent --help``.
"""

__all__ = ["BOOT_MARKER", "CONSOLE_PREFIX", "__version__"]

__version__ = "0.5.0"

#: Line printed to the serial console once the guest is up and its services listen.
BOOT_MARKER = "VMM-GUEST-BOOT-OK"

#: Prefix of every other line the agent prints to the console.
CONSOLE_PREFIX = "vmm-guest"
