"""`--help` of every command: flags read as flags, options show their value type."""

from __future__ import annotations

from typing import Any, Iterator

import typer
from typer.testing import CliRunner

from histosynth.cli.app import app

runner = CliRunner()


def commands(command: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every leaf command of the app with its word path (groups are walked through their `commands`)."""
    command = command or typer.main.get_command(app)
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield path, command


def test_flags_show_no_value_type_in_help() -> None:
    checked = 0
    for path, command in commands():
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
        assert result.exit_code == 0, (path, result.output)
        for line in result.output.splitlines():
            assert "<bool>" not in line, f"histosynth {' '.join(path)} --help: a flag reads as taking a value: {line}"
        flags = [p for p in command.params if getattr(p, "is_flag", False) and p.name != "help"]
        valued = [p for p in command.params if not getattr(p, "is_flag", False) and p.param_type_name == "option"]
        for p in valued[:1]:  # a valued option still shows its type
            line = next(ln for ln in result.output.splitlines() if f"{p.opts[0]} " in ln)
            assert "<" in line, (path, line)
        checked += len(flags)
    assert checked >= 5  # generate --overwrite/--dry-run, evaluate fid --no-cache, ...
