"""The list of commands; one module per command."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable

import typer


def register(app: typer.Typer) -> None:
    from skipconv_cli.cli import calibrate, models_cmd, profile, run, train_gates

    app.command(no_args_is_help=True, help=command_help(run.run, run.EXAMPLES))(run.run)
    app.command(help=command_help(models_cmd.models, models_cmd.EXAMPLES))(models_cmd.models)
    app.command(no_args_is_help=True, help=command_help(profile.profile, profile.EXAMPLES))(profile.profile)
    app.command(no_args_is_help=True, help=command_help(calibrate.calibrate, calibrate.EXAMPLES))(
        calibrate.calibrate
    )
    app.command(
        "train-gates", no_args_is_help=True, help=command_help(train_gates.train_gates, train_gates.EXAMPLES)
    )(train_gates.train_gates)


def command_help(command: Callable, examples: str) -> str:
    """A command's ``--help``: its docstring, each paragraph on one line, then its examples line by line.

    Typer's rich help keeps single line breaks: a docstring wrapped at the source's width broke its sentences
    mid-line at any other terminal width (and examples appended to an indented docstring kept the
    docstring's indentation). Typer dedents the text after the first paragraph leaving that text's first line
    out: with no other paragraph before them, the examples start on a line of their own there (a leading
    line break), or they would lose their indentation."""
    paragraphs = [
        " ".join(line.strip() for line in p.splitlines())
        for p in inspect.cleandoc(command.__doc__ or "").split("\n\n")
    ]
    gap = "\n\n" if len(paragraphs) > 1 else "\n\n\n"
    return "\n\n".join(paragraphs) + gap + textwrap.dedent(examples).strip()
