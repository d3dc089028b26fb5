"""The Typer CLI. One module per command; shared plumbing in common.py."""

from pruneware.cli.app import app, main

__all__ = ["app", "main"]
