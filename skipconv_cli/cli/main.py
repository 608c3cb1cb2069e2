"""Wires the commands together; each command lives in its own module."""

from __future__ import annotations

import os
import sys

import typer

from skipconv_cli import __version__
from skipconv_cli.errors import SkipconvError

app = typer.Typer(
    name="skipconv",
    help="Run convolutional networks on video, computing each conv layer only where the video changed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"skipconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Skip-Convolutions for video: fewer MACs and real speed, no retraining."""


def _register_commands() -> None:
    # Imported here so `skipconv --version` stays fast and a broken command module names itself.
    from skipconv_cli.cli import commands

    commands.register(app)


def main() -> None:
    _register_commands()
    try:
        app(standalone_mode=False)
    except SkipconvError as e:
        if os.environ.get("SKIPCONV_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: outputs written so far are kept", file=sys.stderr)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # click usage errors and anything unexpected: one line unless debugging
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if os.environ.get("SKIPCONV_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set SKIPCONV_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
