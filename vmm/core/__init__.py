"""What every layer may use: errors, config, version, file and socket primitives, names."""
