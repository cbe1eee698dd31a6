"""Every `histosynth ...` command shown in README.md and docs/*.md names a real command, only real options and
no more arguments than the command takes; the README's main command runs (as a dry run); the sampler table
matches the sampler registry."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from histosynth.cli.app import app

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "training.md"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^[ \t]*```[\w-]*\n(.*?)^[ \t]*```", re.S | re.M)
CLI: Any = typer.main.get_command(app)  # built once: building it per documented line is slow


def _commands_in(code: str) -> list[str]:
    """`histosynth` command lines of a block of shell text: continuations joined, comments, prompts and the
    other commands of a `&&`, `;` or `|` chain dropped."""
    lines: list[str] = []
    for line in re.sub(r"\\\n\s*", " ", code).splitlines():
        line = line.split("  #")[0].strip()
        for part in re.split(r"\s(?:&&|;|\|)\s", line):
            part = part.strip().removeprefix("$ ")
            if part.startswith("histosynth "):
                lines.append(part)
    return lines


def doc_commands(text: str) -> list[str]:
    """The `histosynth` command lines of the fenced blocks of a Markdown text."""
    return [line for block in FENCE.findall(text) for line in _commands_in(block)]


def inline_commands(text: str) -> list[str]:
    """`histosynth ...` in inline code spans of the prose (fenced blocks removed first)."""
    prose = FENCE.sub("", text)
    return [span.strip() for span in re.findall(r"`(histosynth [^`]+)`", prose)]


def all_doc_commands() -> list[tuple[str, str, bool]]:
    """(file name, command line, from a fenced block) for every documented command."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        found += [(path.name, line, True) for line in doc_commands(text)]
        found += [(path.name, line, False) for line in inline_commands(text)]
    return found


def resolve(words: list[str], allow_group: bool = False) -> tuple[Any, list[str]]:
    """The command the words name (walking groups) and the words left after it.

    Groups are recognised by their `commands` table, not by isinstance: typer may build its commands
    from a vendored copy of click, whose classes are not `click.Group`. Prose may name a group
    (`histosynth review`, `histosynth train ...`) with `allow_group`.
    """
    command: Any = CLI
    rest = words
    while hasattr(command, "commands") and rest and not rest[0].startswith("-") and rest[0] != "...":
        sub = command.commands.get(rest[0])
        assert sub is not None, f"unknown command {rest[0]!r} in {' '.join(words)}"
        command, rest = sub, rest[1:]
    assert allow_group or not hasattr(command, "commands"), f"{' '.join(words)}: names a group, not a command"
    return command, rest


def variants(words: list[str]) -> list[list[str]]:
    """Synopsis forms spelled out: `train vqgan|encode` is two commands; `[--opt VALUE]` loses its brackets."""
    words = [w.strip("[]") if w.startswith("[") or w.endswith("]") else w for w in words]
    words = [w for w in words if w]
    command: Any = CLI
    for i, word in enumerate(words):
        if not hasattr(command, "commands") or word.startswith("-"):
            break
        if "|" in word:
            return [v for alt in word.split("|") for v in variants([*words[:i], alt, *words[i + 1:]])]
        command = command.commands.get(word)
        if command is None:
            break
    return [words]


def check_command_line(line: str, inline: bool = False) -> None:
    """Assert that a documented command line fits the CLI: command path, option names, argument count."""
    for words in variants(shlex.split(line)[1:]):
        command, rest = resolve(words, allow_group=inline)
        if hasattr(command, "commands"):
            continue  # prose naming a group
        params = {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        params.setdefault("--help", None)
        positional, i = 0, 0
        while i < len(rest):
            word = rest[i]
            if word.startswith("-") and word != "-":
                name = word.split("=")[0]
                assert name in params, f"`{line}`: unknown option {name}; known: {sorted(params)}"
                p = params[name]
                takes_value = p is not None and not p.is_flag and not p.count
                i += 1 + (takes_value and "=" not in word)
            else:
                positional, i = positional + 1, i + 1
        allowed = sum(math.inf if p.nargs == -1 else p.nargs for p in command.params
                      if p.param_type_name == "argument")
        assert positional <= allowed, (f"`{line}`: {positional} argument(s) where `{command.name}` takes "
                                       f"{allowed}: {[w for w in rest if not w.startswith('-')]}")


def test_doc_has_the_stage_commands() -> None:
    names = {" ".join(shlex.split(line)[1:3]) for line in doc_commands(DOC.read_text(encoding="utf-8"))}
    for needed in ("tile slides/", "cluster --latents", "review sheets", "review apply", "train pipeline",
                   "train encode", "export --vqgan", "generate --recipe"):
        assert any(n.startswith(needed) for n in names), f"docs/training.md shows no `histosynth {needed}`"


def test_every_doc_file_is_read() -> None:
    files = {name for name, _, _ in all_doc_commands()}
    assert {"README.md", "training.md", "generate.md", "evaluation.md", "bundle.md"} <= files, files


@pytest.mark.parametrize("where,line", [(f"{name}{'' if block else ' (inline)'}", line)
                                        for name, line, block in all_doc_commands()])
def test_doc_command_fits_the_cli(where: str, line: str) -> None:
    check_command_line(line, inline=where.endswith("(inline)"))


@pytest.mark.parametrize("line,problem", [
    ("histosynth cluster --latents x --kmax 4", "unknown option --kmax"),
    ("histosynth generate my-bundle --recipe r.yaml --out gen/", "1 argument(s)"),  # the flag is --bundle
    ("histosynth evaluate fidd --real a --fake b", "unknown command 'fidd'"),
    ("histosynth train vqgan|encodes --config c.yaml", "unknown command 'encodes'"),
])
def test_checker_catches_wrong_commands(line: str, problem: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(problem)):
        check_command_line(line)


def test_checker_reads_synopses_and_chains() -> None:
    check_command_line("histosynth generate --recipe R.yaml --out DIR [--backend auto|onnx|torch] [--dry-run]")
    check_command_line("histosynth evaluate fid|recon --help")
    assert _commands_in("pip install -e . && histosynth info weights/pcam96 | head") == [
        "histosynth info weights/pcam96"]
    assert inline_commands("run `histosynth merge-shards DIR` later\n```\nhistosynth info\n```\n") == [
        "histosynth merge-shards DIR"]


def test_readme_main_command_runs_as_a_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first command (on the shipped bundle and recipe) gets through every check of a real run."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    main = next(line for line in doc_commands(readme) if line.startswith("histosynth generate"))
    words = shlex.split(main)[1:]
    out = words.index("--out") + 1
    words[out] = str(tmp_path / "data")
    monkeypatch.chdir(REPO)  # the README runs from the checkout
    result = CliRunner().invoke(app, [*words, "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "nothing written" in result.output and not (tmp_path / "data").exists()


def test_sampler_table_matches_the_registry() -> None:
    from histosynth.diffusion.samplers import SAMPLERS

    text = (REPO / "docs" / "generate.md").read_text(encoding="utf-8")
    section = text.split("## Samplers", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([\w-]+)` \|", section, re.M)
    assert documented == list(SAMPLERS), f"docs/generate.md samplers {documented} != registry {list(SAMPLERS)}"


def test_committed_recipes_that_train_sh_runs_resolve_against_the_shipped_bundle() -> None:
    """configs/pcam96/train.sh reruns measured results from recipes kept next to them in weights/pcam96/eval/; a
    wrong relative bundle path (round 12's budget recipe had one) only shows when someone reruns it."""
    from histosynth.sampling.runner import load_plan

    script = (REPO / "configs" / "pcam96" / "train.sh").read_text(encoding="utf-8")
    paths = sorted(set(re.findall(r"--recipe (weights/\S+\.yaml)", script)))
    assert paths, "train.sh names no committed recipe"
    for path in paths:
        _, bundle, _ = load_plan(REPO / path, verify=False)
        assert bundle.path.resolve() == (REPO / "weights" / "pcam96").resolve(), path


TRAINING_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml")
                          if p.name.startswith(("cldm", "ldm", "vqgan")))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_committed_training_configs_load_and_name_committed_weights(path: Path) -> None:
    """Every training config that the model card and train.sh cite still loads into its typed dataclass (a renamed
    or removed key would make a round unreproducible), and the committed files it starts from exist."""
    from histosynth.autoencoder.train import VQGANTrainConfig
    from histosynth.configio import load
    from histosynth.diffusion.train import LDMTrainConfig

    if path.name.startswith("vqgan"):
        config: Any = load(VQGANTrainConfig, path)
    else:
        config = load(LDMTrainConfig, path, root="ldm" if path.name.startswith("ldm") else "cldm")
    named = [getattr(config, k, None) for k in ("init_from", "disc_init_from", "vqgan", "labels", "label_map")]
    for value in named:
        if value is not None and str(value).startswith("weights/"):
            assert (REPO / str(value)).is_file(), f"{path.name} names {value}, which is not committed"
