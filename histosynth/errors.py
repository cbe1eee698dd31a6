"""The two kinds of failure the CLI distinguishes (exit code 2 and exit code 1)."""


class InputError(ValueError):
    """Bad input from the user: a recipe, config, path or option. The CLI exits with code 2."""


class RunError(RuntimeError):
    """A failure while running valid input (disk full, device lost, corrupt model). The CLI exits with code 1."""
