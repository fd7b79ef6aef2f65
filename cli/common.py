"""What every `compress` subcommand shares: one-line user errors, quiet libraries, the error console."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import typer
from rich.console import Console

from slimc.errors import SlimcError

EXIT_USER_ERROR = 2

err_console = Console(stderr=True, highlight=False)


def quiet_libraries() -> None:
    """transformers prints progress bars and hints while loading; the CLI shows its own progress."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {' '.join(str(message).split())}", err=True)


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """SlimcError -> `error: <one line>` on stderr, exit 2; with --debug the traceback is kept.

    Python warnings raised meanwhile print as one `warning: <text>` line each (without --debug)."""
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            yield
    except SlimcError as e:
        if debug:
            raise
        message = " ".join(str(e).split())
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
