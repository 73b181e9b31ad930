"""Files of one JSON value per line that several processes append to and none rewrites.

A line is appended whole, under an exclusive ``flock`` of :data:`LOCK` in the file's folder, so
that processes appending to one file at once neither interleave their lines nor disagree on
the line a value went to (:meth:`JSONLines.append_numbered`). A writer killed mid-line leaves
the last line cut short: reading names it and skips it, and the next append ends it first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import FGQError

LOCK = ".lock"  # held (flock) by the process appending to a file of the folder


class JSONLines:
    """A file of one JSON value per line (see the module docstring).

    Parameters
    ----------
    path
        The file; it need not exist yet.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, skipped: list[str]) -> list[tuple[int, object]]:
        """``(line number from 1, value)`` of each line that is JSON; ``file:line: reason`` of
        the others is added to ``skipped``.

        Raises
        ------
        OSError
            The file exists and cannot be read.
        """
        data = self.path.read_bytes() if self.path.exists() else b""
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        cut_short = bool(lines) and not data.endswith(b"\n")  # a writer was killed
        values = []
        for number, line in enumerate(lines, start=1):
            try:
                values.append((number, json.loads(line)))
            except ValueError as error:  # invalid JSON or UTF-8
                reason = "cut short" if number == len(lines) and cut_short else "not JSON"
                skipped.append(f"{self.path}:{number}: {reason} ({error})")
        return values

    def append(self, value: object) -> None:
        """Append ``value`` as a line (after ending a line cut short)."""
        self._append(value, count=False)

    def append_numbered(self, value: object) -> int:
        """:meth:`append`, and return the line's index from 0, counted in the file as it is
        now (other processes may have appended since it was read)."""
        return self._append(value, count=True)

    def _append(self, value: object, count: bool) -> int:
        """Append under the folder's lock; returns the line's index when ``count``, else -1 (the
        lines are not counted).

        Raises
        ------
        FGQError
            The file cannot be written.
        """
        line = json.dumps(value, separators=(",", ":")) + "\n"
        try:
            with _exclusive(self.path.parent / LOCK), open(self.path, "ab+") as file:
                lines = _count_lines(file) if count else 0
                cut_short = _ends_cut_short(file)
                file.write((("\n" if cut_short else "") + line).encode())
        except OSError as error:
            raise FGQError(f"cannot write {self.path} ({error.strerror or error})") from None
        return lines + cut_short if count else -1


def _ends_cut_short(file) -> bool:
    """Whether an open binary file's last line has no newline (a writer was killed)."""
    end = file.seek(0, os.SEEK_END)
    if end == 0:
        return False
    file.seek(end - 1)
    return file.read(1) != b"\n"


def _count_lines(file) -> int:
    """The newlines of an open binary file."""
    file.seek(0)
    return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` of ``path`` (created if missing)."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
