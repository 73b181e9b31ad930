"""fgq_tvm.tuning: a smoke test of MetaSchedule tuning, record verification, comparisons with
the default schedule, database use.

Tuning here is a few trials of one small kernel (CI never tunes more than a smoke test).
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import replace

import pytest
from helpers import ternary_conv_layer
from tvm.s_tir import Schedule

from fgq_tvm.errors import FGQError
from fgq_tvm.relax_passes.legalize_quantized_layers import KernelSpec
from fgq_tvm.schedules.conv2d import Conv2dShape, Epilogue
from fgq_tvm.schedules.conv2d_dot import dot_conv2d_workload, schedule_dot_conv2d
from fgq_tvm.schedules.intrinsics_x86 import has_vnni
from fgq_tvm.schedules.layout import BLOCKED
from fgq_tvm.target import host_target, parse_target
from fgq_tvm.tuning import (
    COMPARISONS,
    Comparison,
    KernelTask,
    TunedSchedules,
    append_comparison,
    load_comparisons,
    open_database,
    record_key,
    tune,
)

HOST = parse_target(host_target())
pytestmark = pytest.mark.skipif(not has_vnni(HOST), reason="the host CPU has no AVX-512 VNNI")

LAYER = ternary_conv_layer(32, 16, act_scale=0.05)
SHAPE = Conv2dShape(1, 16, 8, 8, 32, (3, 3), padding=(1, 1), group_size=4)
SPEC = KernelSpec(LAYER, SHAPE, "int8-dot-vnni", Epilogue(residual=True, relu=True), BLOCKED)
TASK = KernelTask(SPEC)


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


def test_a_malformed_comparison_is_a_one_line_error(tmp_path):
    (tmp_path / COMPARISONS).write_text('{"workload": "00"}\n')
    with pytest.raises(FGQError, match=r"line 1, is no comparison .*fix or remove the line"):
        load_comparisons(tmp_path)


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
        for _ in range(2):
            (result,) = tune([TASK], HOST, trials=1, folder=tmp_path)
            assert result.trials == 1 and result.comparison is not None
        assert _logging_state(logger) == before
        logger.warning("the application's handler still works")
        assert handler.messages[-1] == "the application's handler still works"
    finally:
        logger.removeHandler(handler)


def test_unreadable_database_is_a_one_line_error(tmp_path):
    (tmp_path / "database_workload.json").write_text("not json\n")
    (tmp_path / "database_tuning_record.json").write_text("")
    with pytest.raises(FGQError, match="cannot open the tuning database in .*--default-schedules"):
        TunedSchedules(tmp_path, HOST, {"conv": LAYER})


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
