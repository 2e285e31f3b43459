"""CLI commands (placeholder until its owner lands the real commands)."""
from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    """Add this module's commands to the root group."""
