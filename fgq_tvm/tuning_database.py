"""Tuning databases: MetaSchedule's JSON database, read line by line and only ever appended to.

A database is a folder with two files of one JSON value per line, as MetaSchedule's
``JSONDatabase`` writes them: ``database_workload.json`` (``[structural hash, module]``: the
unscheduled kernels) and ``database_tuning_record.json`` (``[workload line, record]``: a trace and
its run times; the workload line counts from 0). ``JSONDatabase`` refuses a whole database for one
unreadable line, without saying which; a tune killed while appending leaves a last line cut
short, and the next append would run on into it. :class:`TuningDatabase` reads the same files
line by line instead: it skips an unreadable line and names it (``file:line: what is wrong``),
finishes a cut-short last line before it appends, and never rewrites a file. MetaSchedule's
``JSONDatabase`` reads what it writes.

Several processes may tune into one database at once (a sweep's points, two ``fgq-tvm tune``
runs): each append takes an exclusive ``flock`` of the folder's lock file and counts
the file's lines under it, so a record names the line its workload really got even when
another process appended workloads since this one read the files. A process sees the others'
records when it opens the database again.
"""

from __future__ import annotations

from pathlib import Path

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.database import PyDatabase

from .errors import FGQError, brief
from .jsonlines import JSONLines

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
SKIPPED_SHOWN = 3  # unreadable lines a warning names


def open_database(folder: Path, remedy: str = "fix or move it") -> TuningDatabase:
    """The database in ``folder`` (created if missing).

    Parameters
    ----------
    folder
        The database folder.
    remedy
        What the user can do when it cannot be opened, for the error message (the options
        that fit depend on the command).

    Raises
    ------
    FGQError
        ``folder`` cannot be created or its files cannot be read.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return TuningDatabase(folder)
    except OSError as error:
        reason = error.strerror or str(error)
        raise FGQError(
            f"cannot open the tuning database in {folder} ({reason}); {remedy}"
        ) from None


def skipped_warning(database: TuningDatabase) -> str | None:
    """One line about the unreadable lines ``database`` skipped, or ``None`` if there were none."""
    skipped = database.skipped
    if not skipped:
        return None
    more = f"; and {len(skipped) - SKIPPED_SHOWN} more" if len(skipped) > SKIPPED_SHOWN else ""
    return (
        f"skipped {len(skipped)} unreadable line(s) of the tuning database: "
        f"{'; '.join(skipped[:SKIPPED_SHOWN])}{more} (remove them; new records are appended)"
    )


@derived_object
class TuningDatabase(PyDatabase):
    """The database of a folder (see the module docstring), held in memory; workloads and
    records committed are appended to its files.

    Attributes
    ----------
    skipped
        ``file:line: what is wrong`` for each line that was skipped.
    """

    def __init__(self, folder: Path) -> None:
        from tvm.s_tir import meta_schedule as ms

        self.memory = ms.database.MemoryDatabase(module_equality="structural")
        self.workloads = JSONLines(Path(folder) / WORKLOADS)
        self.records = JSONLines(Path(folder) / RECORDS)
        self.skipped: list[str] = []
        self.lines: dict[int, int] = {}  # structural hash of a workload -> its line in the file
        by_line = self._load_workloads()
        self._load_records(by_line)

    def has_workload(self, mod: tvm.IRModule) -> bool:
        return self.memory.has_workload(mod)

    def commit_workload(self, mod: tvm.IRModule):
        if self.memory.has_workload(mod):
            return self.memory.commit_workload(mod)
        workload = self.memory.commit_workload(mod)
        self.lines[tvm_ffi.structural_hash(mod)] = self.workloads.append_numbered(
            workload.as_json()
        )
        return workload

    def commit_tuning_record(self, record) -> None:
        line = self.lines[tvm_ffi.structural_hash(record.workload.mod)]
        self.records.append([line, record.as_json()])
        self.memory.commit_tuning_record(record)

    def get_top_k(self, workload, top_k: int) -> list:
        return self.memory.get_top_k(workload, top_k)

    def get_all_tuning_records(self) -> list:
        return self.memory.get_all_tuning_records()

    def __len__(self) -> int:
        return len(self.memory)

    def _load_workloads(self) -> dict[int, object]:
        """Commit the readable workloads to memory; returns them by line (from 0)."""
        from tvm.s_tir import meta_schedule as ms

        by_line = {}
        for number, value in self.workloads.read(self.skipped):
            try:
                if not (isinstance(value, list) and len(value) == 2):
                    raise ValueError("not a workload: expected [structural hash, module]")
                mod = ms.database.Workload.from_json(value).mod
            except Exception as error:  # TVM raises several types on a malformed module
                self.skipped.append(f"{self.workloads.path}:{number}: {brief(error)}")
                continue
            by_line[number - 1] = self.memory.commit_workload(mod)
            self.lines.setdefault(tvm_ffi.structural_hash(mod), number - 1)
        return by_line

    def _load_records(self, by_line: dict[int, object]) -> None:
        """Commit the readable records of readable workloads to memory."""
        from tvm.s_tir import meta_schedule as ms

        for number, value in self.records.read(self.skipped):
            try:
                if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)):
                    raise ValueError("not a tuning record: expected [workload line, record]")
                if value[0] not in by_line:
                    raise ValueError(f"workload line {value[0]} is missing or unreadable")
                record = ms.database.TuningRecord.from_json(value[1], by_line[value[0]])
            except Exception as error:  # TVM raises several types on a malformed record
                self.skipped.append(f"{self.records.path}:{number}: {brief(error)}")
                continue
            self.memory.commit_tuning_record(record)
