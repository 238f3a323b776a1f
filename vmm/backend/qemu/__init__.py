"""The QEMU backend: the argv builder, QMP, and QEMU processes owned by the supervisor."""
