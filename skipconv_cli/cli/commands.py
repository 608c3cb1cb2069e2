"""The list of commands; one module per command."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
