"""What every command shares: the console and the mapping of failures to exit codes."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from histosynth.errors import InputError, RunError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Print `InputError` (exit 2) and `RunError`/`OSError` (exit 1) as one clear line, no traceback.

    Messages are printed as plain text (no rich markup: `cuda[:N]` must survive) and never wrapped.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            err_console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
            raise typer.Exit(2) from None
        except (RunError, OSError) as e:
            err_console.print(Text.assemble(("failed: ", "bold red"), str(e)), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
