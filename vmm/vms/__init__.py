"""The lifecycle layer: the VM registry, reconciliation, updates, limits, restarts, logs."""
