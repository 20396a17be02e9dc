"""CLI commands, one module per command group; each registers itself on :data:`qkvprobe.cli.app`."""
