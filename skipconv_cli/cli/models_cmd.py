"""`skipconv models`: the built-in models."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from skipconv_cli.models.factory import count_macs
from skipconv_cli.models.registry import list_models

EXAMPLES = """
Examples:

  skipconv models

  skipconv models --json | jq '.[] | select(.task == "pose") | .name'
"""


def models(
    json_out: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """List the built-in models: name, task, input size, GMAC at that size, license, source."""
    rows = []
    for spec in list_models():
        h, w = spec.input_size
        rows.append(
            {
                "name": spec.name,
                "task": spec.task,
                "input_size": [h, w],
                "gmac": round(count_macs(spec.build().eval(), spec.input_size) / 1e9, 3),
                "weights": spec.weights,
                "license": spec.license,
                "source": spec.source,
            }
        )
    if json_out:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    table = Table(title="built-in models")
    for column in ("name", "task", "input (HxW)", "GMAC", "license", "source"):
        table.add_column(column, overflow="fold")
    for row in rows:
        h, w = row["input_size"]
        table.add_row(
            row["name"], row["task"], f"{h}x{w}", f"{row['gmac']:.2f}", row["license"], row["source"]
        )
    Console().print(table)
