"""What the commands show and write for people: progress bars, result files written whole."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import FGQError

BAR_WIDTH = 20


def progress_bar(done: int, total: int) -> str:
    """``[#####---------------] done/total``."""
    filled = BAR_WIDTH * done // total
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total}"


def progress_printer(prefix: str) -> Callable[[str], None]:
    """A progress callback that prints each stage on stderr with the seconds since it was
    created: ``PREFIX: [  12.3s] stage``.

    Parameters
    ----------
    prefix
        What each line starts with, e.g. the program's name.

    Returns
    -------
    Callable[[str], None]
        The callback, called with one stage at a time.
    """
    start = time.monotonic()

    def report(stage: str) -> None:
        print(f"{prefix}: [{time.monotonic() - start:6.1f}s] {stage}", file=sys.stderr, flush=True)

    return report


def progress_bar_printer(prefix: str, unit: str) -> Callable[[int, int], None]:
    """A ``(done, total)`` progress callback that draws :func:`progress_bar` on stderr:
    redrawn in place on a terminal, else a line per tenth.

    Parameters
    ----------
    prefix
        What each line starts with, e.g. the program's name.
    unit
        What is counted, written after the bar (``"images"``).

    Returns
    -------
    Callable[[int, int], None]
        The callback, called with the items done and the items in all.
    """
    shown = [-1]

    def update(done: int, total: int) -> None:
        tenth = 10 * done // total
        terminal = sys.stderr.isatty()
        if not terminal and tenth == shown[0]:
            return
        shown[0] = tenth
        end = "\n" if not terminal or done == total else ""
        line = f"\r{prefix}: {progress_bar(done, total)} {unit}"
        print(line, end=end, file=sys.stderr, flush=True)

    return update


def output_folder(path: Path) -> Path:
    """``path``, created with its parents if missing, and checked to take new files.

    Raises
    ------
    FGQError
        ``path`` exists and is not a folder, cannot be created, or takes no new files.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = error.strerror or str(error)
        raise FGQError(f"cannot create the output folder {path} ({reason})") from None
    return writable_folder(path)


def output_file(path: Path) -> Path:
    """``path``, refused before any work if it cannot be written: its folder is missing or
    takes no new files, or ``path`` is a folder.

    Raises
    ------
    FGQError
        ``path`` cannot be written.
    """
    if not path.parent.is_dir():
        raise FGQError(f"output directory {str(path.parent)!r} does not exist: create it first")
    if path.is_dir():
        raise FGQError(f"output {str(path)!r} is a directory; give a file name")
    writable_folder(path.parent)
    return path


def writable_folder(folder: Path) -> Path:
    """``folder``, once a file was created in it and removed: permission bits cannot tell
    (root ignores them; read-only file systems and ``/proc`` refuse root too).

    Raises
    ------
    FGQError
        No file can be created in ``folder``.
    """
    try:
        handle, probe = tempfile.mkstemp(prefix=".fgq-tvm-probe-", dir=folder)
    except OSError as error:
        reason = error.strerror or str(error)
        raise FGQError(f"cannot write in the output folder {folder} ({reason})") from None
    os.close(handle)
    os.unlink(probe)
    return folder


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` by calling ``write`` on a temporary file beside it, then renaming it into
    place (with the permissions a new file gets): no reader ever sees half a file, and a failed
    write leaves nothing behind.

    Raises
    ------
    FGQError
        The file cannot be written (missing folder, no permission, full disk).
    """
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise FGQError(f"cannot write {path} ({error.strerror or error})") from None
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """:func:`write_atomically` of ``text`` (UTF-8)."""
    write_atomically(path, lambda file: file.write(text.encode()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
