"""The list of commands; one module per command."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from skipconv_cli.cli.calibrate import calibrate
    from skipconv_cli.cli.models_cmd import models
    from skipconv_cli.cli.profile import profile
    from skipconv_cli.cli.run import run
    from skipconv_cli.cli.train_gates import train_gates

    app.command(no_args_is_help=True)(run)
    app.command()(models)
    app.command(no_args_is_help=True)(profile)
    app.command(no_args_is_help=True)(calibrate)
    app.command("train-gates", no_args_is_help=True)(train_gates)
