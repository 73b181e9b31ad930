"""fgq_tvm.tuning: a smoke test of MetaSchedule tuning, record verification, comparisons with
the default schedule, database use.

Tuning here is a few trials of one small kernel (CI never tunes more than a smoke test).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import pytest
from helpers import vnni_tuning_case
from tvm.s_tir import Schedule
from tvm_ffi import structural_hash

from fgq_tvm.errors import FGQError
from fgq_tvm.schedules.conv2d_dot import dot_conv2d_workload, schedule_dot_conv2d
from fgq_tvm.schedules.core import Epilogue
from fgq_tvm.schedules.intrinsics_x86 import has_vnni
from fgq_tvm.schedules.layout import BLOCKED
from fgq_tvm.target import host_target, parse_target, target_key
from fgq_tvm.tuning import (
    COMPARISONS,
    FINISHED,
    Comparison,
    KernelTask,
    TunedSchedules,
    append_comparison,
    load_comparisons,
    measured_schedules,
    open_database,
    record_key,
    search_context,
    search_temporaries,
    tune,
)
from fgq_tvm.tuning_database import RECORDS, WORKLOADS

HOST = parse_target(host_target())
pytestmark = pytest.mark.skipif(not has_vnni(HOST), reason="the host CPU has no AVX-512 VNNI")

LAYER, SHAPE, SPEC, TASK = vnni_tuning_case()


def records(folder) -> list[dict]:
    path = folder / "database_tuning_record.json"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tuning_logs") / "llvm-host"
    return folder, tune([TASK], HOST, trials=3, folder=folder)


def test_tuning_records_verified_schedules_and_compares_the_best_with_the_default(tuned):
    folder, (result,) = tuned
    assert result.trials >= 1 and result.best_ms is not None and result.rejected == 0
    assert len(records(folder)) >= 1
    best = open_database(folder).query_tuning_record(TASK.workload(), HOST, "main")
    comparison = result.comparison
    assert (comparison.workload, comparison.trace) == record_key(TASK, best)
    assert comparison.tuned_ms > 0 and comparison.default_ms > 0
    assert load_comparisons(folder) == {record_key(TASK, best): comparison}


def _with_verdict(folder, tmp_path, tuned_wins: bool):
    """A copy of the tuned database whose latest comparison says ``tuned_wins``."""
    copy = shutil.copytree(folder, tmp_path / "copy")
    best = open_database(copy).query_tuning_record(TASK.workload(), HOST, "main")
    times = (1.0, 2.0) if tuned_wins else (2.0, 1.0)
    append_comparison(copy, Comparison(*record_key(TASK, best), *times))
    return copy


def test_compile_takes_the_best_record_after_checking_it(tuned, tmp_path):
    folder = _with_verdict(tuned[0], tmp_path, tuned_wins=True)
    schedules = TunedSchedules(folder, HOST, {"conv": LAYER})
    func = schedules(SPEC.kernels().layer.with_attrs(SPEC.attributes("fgq_conv")))
    assert func is not None and TASK.verify(func, HOST) and not schedules.failed


def test_a_record_slower_than_the_default_is_not_used(tuned, tmp_path):
    folder = _with_verdict(tuned[0], tmp_path, tuned_wins=False)
    schedules = TunedSchedules(folder, HOST, {"conv": LAYER})
    assert schedules(SPEC.kernels().layer.with_attrs(SPEC.attributes("fgq_conv"))) is None
    assert schedules.slower == [TASK.name] and not schedules.failed


def test_zero_trials_only_compares_and_appends(tuned, tmp_path):
    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    before = records(folder)
    lines = (folder / COMPARISONS).read_text().count("\n")
    (result,) = tune([TASK], HOST, trials=0, folder=folder)
    assert result.trials == 0 and result.comparison is not None
    assert records(folder) == before
    assert (folder / COMPARISONS).read_text().count("\n") == lines + 1


def test_unreadable_comparison_and_finished_lines_are_named_and_skipped(tuned, tmp_path):
    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    with (folder / COMPARISONS).open("a") as file:
        file.write('{"workload": "00"}\n{"workload": "00", "tr')  # the last cut short by a kill
    skipped = []
    assert load_comparisons(folder, skipped) == load_comparisons(tuned[0])
    lines = (folder / COMPARISONS).read_text().count("\n")
    first, second = sorted(skipped)
    assert first.startswith(f"{folder / COMPARISONS}:{lines}: not a comparison")
    assert second.startswith(f"{folder / COMPARISONS}:{lines + 1}: cut short")
    with (folder / FINISHED).open("a") as file:
        file.write("[1, 2]\n")
    messages = []
    (result,) = tune([TASK], HOST, trials=3, folder=folder, progress=messages.append)
    assert result.skipped
    assert messages[0].startswith("warning: skipped 1 unreadable line(s) of the tuning database")
    assert f"{folder / FINISHED}:" in messages[0] and "not a finished search" in messages[0]


def test_a_record_that_fails_the_check_is_not_used(tuned, tmp_path, monkeypatch):
    folder = _with_verdict(tuned[0], tmp_path, tuned_wins=True)
    monkeypatch.setattr(KernelTask, "verify", lambda self, func, target, seed=0: False)
    schedules = TunedSchedules(folder, HOST, {"conv": LAYER})
    assert schedules(SPEC.kernels().layer.with_attrs(SPEC.attributes("fgq_conv"))) is None
    assert schedules.failed == [TASK.name]


def test_wrong_candidates_are_never_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(KernelTask, "verify", lambda self, func, target, seed=0: False)
    (result,) = tune([TASK], HOST, trials=2, folder=tmp_path)
    assert result.best_ms is None and result.rejected == result.trials >= 1
    assert records(tmp_path) == []


class _Collecting(logging.Handler):
    """A handler without a name, like those pytest 9.2 adds to loggers that do not propagate."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _logging_state(logger: logging.Logger) -> tuple:
    root = logging.getLogger()
    return list(logger.handlers), logger.level, logger.propagate, list(root.handlers), root.level


def test_searches_neither_depend_on_nor_change_the_applications_logging(tmp_path):
    """MetaSchedule's tune_tir configured logging anew for every search and failed on an
    unnamed handler on its logger (issue 13: the second search of a pytest 9.2 session)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    handler = _Collecting()
    logger.addHandler(handler)
    try:
        before = _logging_state(logger)
        for run in range(2):
            (result,) = tune([TASK], HOST, trials=1, folder=tmp_path / str(run))
            assert result.trials == 1 and result.comparison is not None
        assert _logging_state(logger) == before
        logger.warning("the application's handler still works")
        assert handler.messages[-1] == "the application's handler still works"
    finally:
        logger.removeHandler(handler)


def test_unreadable_database_lines_are_skipped_and_named(tuned, tmp_path):
    """A tune killed while appending leaves a line cut short: it is skipped and named, and the
    next record goes on a line of its own (issue 14)."""
    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    workloads, records_file = folder / WORKLOADS, folder / RECORDS
    count = len(records(folder))
    with workloads.open("a") as file:
        file.write("not json\n")
    with records_file.open("a") as file:
        file.write('[0, [[["GetSBlock"')
    database = open_database(folder)
    assert database.skipped == [
        f"{workloads}:2: not JSON (Expecting value: line 1 column 1 (char 0))",
        f"{records_file}:{count + 1}: cut short (Expecting ',' delimiter: line 1 column 19 "
        "(char 18))",
    ]
    best = database.query_tuning_record(TASK.workload(), HOST, "main")
    database.commit_tuning_record(best)
    assert len(open_database(folder)) == count + 1
    assert len(records_file.read_text().splitlines()) == count + 2
    warning = TunedSchedules(folder, HOST, {"conv": LAYER}).unreadable
    assert f"{workloads}:2: not JSON" in warning and f"{records_file}:{count + 1}: " in warning


def test_an_unusable_database_folder_is_an_error_that_fits_the_command(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FGQError, match="cannot open the tuning database .*--default-schedules"):
        TunedSchedules(tmp_path / "file", HOST, {"conv": LAYER})
    with pytest.raises(FGQError, match="cannot open .*tune into another --tuning-logs DIR$"):
        tune([TASK], HOST, trials=1, folder=tmp_path / "file")


def test_a_rerun_skips_the_searches_that_finished(tuned, tmp_path):
    folder = shutil.copytree(tuned[0], tmp_path / "copy")
    before = {path.name: path.read_text() for path in folder.iterdir()}
    lines = []
    (result,) = tune([TASK], HOST, trials=3, folder=folder, progress=lines.append)
    assert result.skipped and result.trials == 0 and result.best_ms == tuned[1][0].best_ms
    measured = len(records(folder))
    assert lines == [
        f"[{'#' * 20}] 1/1 {TASK.name}: had records ({measured} measured), best "
        f"{result.best_ms:.3f} ms"
    ]
    assert {path.name: path.read_text() for path in folder.iterdir()} == before


def test_a_search_never_proposes_a_schedule_the_database_measured(tuned, tmp_path):
    """MetaSchedule's evolutionary search proposes the database's records again (issue 14)."""
    from tvm.s_tir import meta_schedule as ms

    database = open_database(shutil.copytree(tuned[0], tmp_path / "copy"))
    workload = TASK.workload()
    measured = measured_schedules(database, workload)
    space = ms.space_generator.ScheduleFn(
        schedule_dot_conv2d, sch_rules=[], postprocs=[], mutator_probs={}
    )
    context = search_context(workload, HOST, "main", space, "evolutionary", seed=0)
    search = context.search_strategy
    design_spaces = space.generate_design_space(workload)
    search.pre_tuning(64, 16, design_spaces, database, ms.cost_model.RandomModel())
    proposed = set()
    while (candidates := search.generate_measure_candidates()) is not None:
        proposed |= {structural_hash(candidate.sch.mod) for candidate in candidates}
        ran = [ms.runner.RunnerResult([1e-3], None)] * len(candidates)
        search.notify_runner_results(candidates, ran)
    search.post_tuning()
    assert len(measured) == len(records(tmp_path / "copy")) >= 1
    assert not measured & proposed


def test_search_temporaries_are_removed_with_those_of_killed_searches(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()
    for pid in (ended.pid, os.getppid()):
        (tmp_path / f"fgq-tune-{pid}").mkdir()
        (tmp_path / f"fgq-tune-{pid}" / "artifact.tar").write_text("")
    with search_temporaries() as folder:
        assert folder == tmp_path / f"fgq-tune-{os.getpid()}"
        assert os.environ["TMPDIR"] == tempfile.gettempdir() == str(folder)
        child = subprocess.run(
            [sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert child.stdout.strip() == str(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"fgq-tune-{os.getppid()}"]
    assert tempfile.tempdir == str(tmp_path)


def test_ctrl_c_ends_tune_with_one_line_and_leaves_no_temporaries(tmp_path):
    """Ctrl-C (SIGINT to the process group) while a search runs (issue 14)."""
    import torch
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 10),
    ).eval()  # fmt: skip
    torch.export.save(torch.export.export(model, (torch.zeros(1, 3, 8, 8),)), tmp_path / "m.pt2")
    temporary, logs = tmp_path / "tmp", tmp_path / "logs"
    temporary.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "FGQ_TVM_DEBUG"}
    tune_command = ["tune", tmp_path / "m.pt2", "--trials", "2", "--tuning-logs", logs]
    process = subprocess.Popen(
        [sys.executable, "-m", "fgq_tvm", *map(str, tune_command)], stderr=subprocess.PIPE,
        text=True, env={**env, "TMPDIR": str(temporary)}, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (temporary / f"fgq-tune-{process.pid}").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(2)  # the search is building its first candidates
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    after = stderr.splitlines()[-1:]
    folder = logs / target_key(HOST)
    assert stderr.splitlines()[-2].endswith(f"into {folder}"), stderr
    assert after == [f"fgq-tvm: error: interrupted; the records so far are in {folder}"], stderr
    assert not list(temporary.glob("fgq-tune-*")) and not list(temporary.glob("tmp*"))


def test_verification_catches_a_kernel_of_other_arithmetic():
    plain = replace(SPEC, epilogue=Epilogue()).kernels().layer
    with_relu = KernelTask(replace(SPEC, epilogue=Epilogue(relu=True)))
    assert not with_relu.verify(plain, HOST)


@pytest.mark.parametrize("encoding", ["ternary_int8_scales", "ternary_group_scales"])
def test_every_point_of_the_space_replays(encoding):
    """MetaSchedule mutates a trace's sampled decisions and replays it: every combination of
    knobs must replay the same schedule steps (a loop that vanishes for one tile size would
    change the outputs of a later step)."""
    workload = dot_conv2d_workload(SHAPE, LAYER.act, encoding, SPEC.epilogue, BLOCKED)
    sampled = Schedule(workload)
    schedule_dot_conv2d(sampled)
    samples = [i for i in sampled.trace.insts if i.kind.name == "SampleCategorical"]
    for picks in itertools.product(*(range(len(i.attrs[0])) for i in samples)):
        trace = sampled.trace
        for instruction, pick in zip(samples, picks, strict=True):
            trace = trace.with_decision(instruction, pick, remove_postproc=True)
        trace.apply_to_schedule(Schedule(workload), remove_postproc=False)
