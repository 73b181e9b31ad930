"""What the commands show and write for people: progress bars, result files written whole."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import FGQError

BAR_WIDTH = 20


def progress_bar(done: int, total: int) -> str:
    """``[#####---------------] done/total``."""
    filled = BAR_WIDTH * done // total
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total}"


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
