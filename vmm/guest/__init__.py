"""The daemon's side of the guest channels: the per-VM channel hub and the host API."""
