"""Errors that the command line reports as one line, without a traceback."""


class FGQError(Exception):
    """A problem with the user's input or environment; the CLI exits with status 1."""

    exit_code = 1


class UsageError(FGQError):
    """A malformed command line option; the CLI exits with status 2."""

    exit_code = 2


def brief(error: BaseException) -> str:
    """The exception's type and first sentence, shortened, for a one-line error."""
    lines = str(error).strip().splitlines()
    first = lines[0].split(". ")[0][:100] if lines else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


class Interrupted(FGQError):
    """Ctrl-C, reported with what was kept; the CLI exits with status 130 (128 + SIGINT)."""

    exit_code = 130
