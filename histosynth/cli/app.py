"""Root of the `histosynth` command; each subcommand lives in its own module with `register(app)`."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="histosynth",
    help="Synthetic H&E histopathology tiles from a cluster-conditioned latent diffusion model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Order is the order of `histosynth --help`: the main job first, then the training stages in data-flow order.
COMMAND_MODULES = ("generate", "info", "export", "tile", "train", "cluster", "review", "evaluate")

for _name in COMMAND_MODULES:
    importlib.import_module(f"histosynth.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
