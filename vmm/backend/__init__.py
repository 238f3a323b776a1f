"""Backends: what runs a VM's QEMU. ``base.VmBackend`` is the only thing the lifecycle layer sees."""
