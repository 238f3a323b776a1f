"""Minimal in-guest agent of the vmm development image.

It runs inside the guest as a child of the image's init: it mounts the host share, reports
boot to the serial console, serves a small HTTP status endpoint and powers the VM off on
the ACPI power button.
"""

__all__ = ["BOOT_MARKER", "CONSOLE_PREFIX", "__version__"]

__version__ = "0.5.0"

#: Line printed to the serial console once the guest is up and its services listen.
BOOT_MARKER = "VMM-GUEST-BOOT-OK"

#: Prefix of every other line the agent prints to the console.
CONSOLE_PREFIX = "vmm-guest"
