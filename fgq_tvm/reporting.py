"""What the commands show and write for people: progress bars, result files written whole."""

from __future__ import annotations

from pathlib import Path

from .errors import FGQError

BAR_WIDTH = 20


def progress_bar(done: int, total: int) -> str:
    """``[#####---------------] done/total``."""
    filled = BAR_WIDTH * done // total
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total}"


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed into place: no
    reader ever sees half a file, and a failed write leaves nothing behind.

    Raises
    ------
    FGQError
        The file cannot be written (missing folder, no permission, full disk).
    """
    staged = path.with_name(f".{path.name}.tmp")
    try:
        staged.write_text(text)
        staged.replace(path)
    except OSError as error:
        staged.unlink(missing_ok=True)
        raise FGQError(f"cannot write {path} ({error.strerror or error})") from None
