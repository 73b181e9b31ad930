"""Errors that the command line reports as one line, without a traceback."""


class FGQError(Exception):
    """A problem with the user's input or environment; the CLI exits with status 1."""

    exit_code = 1


class UsageError(FGQError):
    """A malformed command line option; the CLI exits with status 2."""

    exit_code = 2
