"""Networking of VMs: MAC addresses, NIC resolution, host-port checks."""
