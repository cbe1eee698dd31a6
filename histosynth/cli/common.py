"""What every command shares: the console and the mapping of failures to exit codes."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from histosynth.errors import InputError, RunError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable)


def _flags_show_no_type() -> None:
    """Show boolean flags in `--help` without a type column (`--dry-run`, not `--dry-run <bool>`).

    Typer's rich help prints a type for every option, so a flag read as if it took a value. Typer has no
    setting for this and builds its option class itself, so its one display hook is wrapped, once, for all
    commands; typers without the hook print no flag types anyway.
    """
    from typer.core import TyperOption

    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "flags_show_no_type", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        if self.is_flag and not self.count:
            return None
        return original(self, ctx)

    display_type_rich.flags_show_no_type = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()


def file_in_the_way(path: object) -> Optional[Path]:
    """The existing non-folder that is `path` or one of its parents, if any (why an OS call said ENOTDIR)."""
    if not path:
        return None
    target = Path(os.fsdecode(path)) if isinstance(path, (str, bytes, os.PathLike)) else None
    if target is None:
        return None
    for candidate in (target, *target.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def handle_errors(fn: F) -> F:
    """Print `InputError` (exit 2) and `RunError`/`OSError` (exit 1) as one clear line, no traceback.

    An OS error because a file sits where a folder must be (`--out some.png`) is the user's input: exit 2.

    Messages are printed as plain text (no rich markup: `cuda[:N]` must survive) and never wrapped.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InputError as e:
            err_console.print(Text.assemble(("error: ", "bold red"), str(e)), soft_wrap=True)
            raise typer.Exit(2) from None
        except (NotADirectoryError, FileExistsError) as e:
            # A path the user gave runs into a file where a folder must be: bad input, not a failure.
            blocking = file_in_the_way(e.filename)
            if blocking is None:
                err_console.print(Text.assemble(("failed: ", "bold red"), str(e)), soft_wrap=True)
                raise typer.Exit(1) from None
            err_console.print(Text.assemble(("error: ", "bold red"),
                                            f"{blocking} is a file where a folder is needed (for {e.filename}); "
                                            "choose another path"), soft_wrap=True)
            raise typer.Exit(2) from None
        except (RunError, OSError) as e:
            err_console.print(Text.assemble(("failed: ", "bold red"), str(e)), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]
