"""Every `histosynth ...` command line in docs/training.md names a real command and only real options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer

from histosynth.cli.app import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def doc_commands(text: str) -> list[str]:
    """The `histosynth` command lines of the bash blocks, continuation lines joined, comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("histosynth "):
                lines.append(line)
    return lines


def resolve(words: list[str]) -> tuple[Any, list[str]]:
    """The command the words name (walking groups) and the words left after it.

    Groups are recognised by their `commands` table, not by isinstance: typer may build its commands
    from a vendored copy of click, whose classes are not `click.Group`.
    """
    command: Any = typer.main.get_command(app)
    rest = words
    while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"unknown command {rest[0]!r} in {' '.join(words)}"
        command, rest = sub, rest[1:]
    assert not hasattr(command, "commands"), f"{' '.join(words)}: names a group, not a command"
    return command, rest


def test_doc_has_the_stage_commands() -> None:
    names = {" ".join(shlex.split(line)[1:3]) for line in doc_commands(DOC.read_text(encoding="utf-8"))}
    for needed in ("tile slides/", "cluster --latents", "review sheets", "review apply", "train pipeline",
                   "train encode", "export --vqgan", "generate --recipe"):
        assert any(n.startswith(needed) for n in names), f"docs/training.md shows no `histosynth {needed}`"


@pytest.mark.parametrize("line", doc_commands(DOC.read_text(encoding="utf-8")))
def test_doc_command_options_exist(line: str) -> None:
    command, rest = resolve(shlex.split(line)[1:])
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    used = {w.split("=")[0] for w in rest if w.startswith("-")}
    assert used <= known, f"`{line}`: unknown options {sorted(used - known)}; known: {sorted(known)}"


def test_checker_catches_a_wrong_option() -> None:
    command, rest = resolve(["cluster", "--latents", "x", "--kmax", "4"])
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    assert "--kmax" not in known and "--k-max" in known
