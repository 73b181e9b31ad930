"""fgq_tvm.tuning_database: several writers of one database (issue 17: two tuners writing one
database do not corrupt it).

The line-level test runs real processes; the database-level one holds two databases of one
folder in this process, each with the view of the files it read, as two processes would.
"""

from __future__ import annotations

import json
import multiprocessing

import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms

from fgq_tvm.jsonlines import JSONLines
from fgq_tvm.tuning_database import RECORDS, WORKLOADS, open_database

WRITES = 200


def _append_numbered(path, writer: int, queue) -> None:
    lines = JSONLines(path)
    queue.put([(lines.append_numbered({"writer": writer, "value": i}), i) for i in range(WRITES)])


def test_lines_appended_by_two_processes_at_once_get_the_indices_they_were_told(tmp_path):
    path = tmp_path / WORKLOADS
    path.write_bytes(b'{"first": 0}\n{"cut": ')  # a writer was killed mid-line
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    writers = [context.Process(target=_append_numbered, args=(path, w, queue)) for w in (0, 1)]
    for process in writers:
        process.start()
    told = {index: value for _ in writers for index, value in queue.get(timeout=60)}
    for process in writers:
        process.join(timeout=60)
        assert process.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 2 + 2 * WRITES and lines[1] == '{"cut": '
    written = [json.loads(line) for line in lines[2:]]
    assert sorted(told) == list(range(2, 2 + 2 * WRITES))
    for index, value in told.items():
        assert json.loads(lines[index])["value"] == value
    for writer in (0, 1):  # each writer's lines in its own order
        assert [v["value"] for v in written if v["writer"] == writer] == list(range(WRITES))


def _workload(size: int) -> tvm.IRModule:
    a = te.placeholder((size,), name="a")
    b = te.compute((size,), lambda i: a[i] * 2.0, name="b")
    return tvm.IRModule({"main": te.create_prim_func([a, b])})


def _record(database, mod: tvm.IRModule, seconds: float):
    workload = database.commit_workload(mod)
    sch = Schedule(mod)
    sch.get_sblock("b")
    trace = sch.trace
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    target = tvm.target.Target("llvm")
    return ms.database.TuningRecord(trace, workload, [seconds], target, args)


def test_two_databases_of_one_folder_keep_each_others_records(tmp_path):
    """Each database read the folder before the other appended: the records it appends still
    name the line its own workload went to."""
    folder = tmp_path / "llvm-host"
    first, second = open_database(folder), open_database(folder)
    first.commit_tuning_record(_record(first, _workload(16), 1e-3))
    second.commit_tuning_record(_record(second, _workload(32), 2e-3))
    first.commit_tuning_record(_record(first, _workload(16), 5e-4))
    reopened = open_database(folder)
    assert reopened.skipped == []
    assert len((folder / WORKLOADS).read_text().splitlines()) == 2
    assert len((folder / RECORDS).read_text().splitlines()) == 3
    for size, best in ((16, 5e-4), (32, 2e-3)):
        workload = reopened.commit_workload(_workload(size))
        (top,) = reopened.get_top_k(workload, 1)
        assert [float(t) for t in top.run_secs] == [best]
        tvm.ir.assert_structural_equal(top.workload.mod, _workload(size))
