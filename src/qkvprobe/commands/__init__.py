"""CLI commands, one module per command group: plain functions that :func:`qkvprobe.cli.build_app` registers."""
