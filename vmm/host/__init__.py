"""What this host can do: accelerator, TEE platform, guest channel, GPUs."""
