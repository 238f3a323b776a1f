"""A host daemon that runs confidential VMs with QEMU and speaks the dstack VMM API."""

from vmm.core.version import __version__

__all__ = ["__version__"]
