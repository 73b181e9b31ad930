"""Errors that the command line reports as one line, without a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


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


def exit_status(command: Callable[[], int], prog: str) -> int:
    """Call ``command`` and return its exit status, reporting a failure as one line,
    ``PROG: error: <message>``, on standard error.

    Parameters
    ----------
    command
        What to run; it returns the exit status.
    prog
        The program name that starts the line (``fgq-tvm``).

    Returns
    -------
    int
        ``command``'s status; for an :class:`FGQError` its ``exit_code`` (2 for usage errors,
        1 otherwise), 130 for Ctrl-C, 1 for any other exception (reported as "internal error",
        re-raised with its traceback where ``FGQ_TVM_DEBUG=1``).
    """
    try:
        return command()
    except FGQError as error:
        _print_error(prog, str(error))
        return error.exit_code
    except KeyboardInterrupt:
        _print_error(prog, "interrupted")
        return 130
    except Exception as error:
        if os.environ.get("FGQ_TVM_DEBUG") == "1":
            raise
        _print_error(prog, f"internal error: {brief(error)}")
        return 1


def _print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {' '.join(message.splitlines())}", file=sys.stderr, flush=True)
