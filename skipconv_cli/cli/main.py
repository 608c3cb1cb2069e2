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
        # Without standalone mode typer returns exit codes instead of exiting: Ctrl-C comes back as 130.
        code = app(standalone_mode=False)
    except SkipconvError as e:
        if os.environ.get("SKIPCONV_DEBUG"):
            raise
        _fail(str(e), 1)
    except KeyboardInterrupt:
        _fail("interrupted: outputs written so far are kept", 130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except typer.TyperException as e:  # usage errors (bad option values): one line like every other error
        _fail(e.format_message(), getattr(e, "exit_code", 2))
    except Exception as e:  # anything unexpected: one line unless debugging
        if os.environ.get("SKIPCONV_DEBUG"):
            raise
        _fail(f"{type(e).__name__}: {e} (set SKIPCONV_DEBUG=1 for the traceback)", 1)
    if code == 130:
        _fail("interrupted: outputs written so far are kept", 130)
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
