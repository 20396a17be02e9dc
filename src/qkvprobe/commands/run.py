"""CLI command(s): placeholder, filled by the owner of this module."""

from __future__ import annotations

from ..cli import app, edge  # noqa: F401
