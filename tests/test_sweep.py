"""fgq_tvm.sweep: points, the append-only results, resuming, failures and the outputs (issue 17).

The loop is tested with a stand-in for the measurement (no compile); test_sweep_cli.py runs
real sweeps.
"""

from __future__ import annotations

import csv
import json

import pytest

from fgq_tvm.errors import FGQError
from fgq_tvm.sweep import DeviceGone, PointResult, SweepResults, run_sweep, sweep_points
from fgq_tvm.sweep.results import OUTPUTS, POINTS

MODELS = [("cifar_resnet20", "weights/resnet20.th")]


def points(devices=("local",)):
    return sweep_points(MODELS, [4, 64], [8], ["llvm-znver4"], list(devices))


def measured(point, latency=1.0):
    return PointResult(
        point, latency_ms=latency, spread_ms=0.1, module_bytes=2048, module="m.so",
        tuned_kernels=1, kernels=2, float_top1=0.8, top1=0.79, accuracy_images=100, seconds=3,
    )  # fmt: skip


class Measure:
    """Measures points in a given way, and remembers which it was asked for."""

    def __init__(self, outcome=measured):
        self.outcome = outcome
        self.asked = []

    def __call__(self, point):
        self.asked.append(point.key)
        return self.outcome(point)


def test_points_are_every_combination_with_unique_keys():
    sweep = sweep_points(MODELS, [4, None], [8, 4], ["t1", "t2"], ["local", "k@h:1"])
    assert len(sweep) == 16 == len({point.key for point in sweep})
    assert sweep[0].key == "cifar_resnet20[resnet20.th]/N4/a8/t1/local"
    assert sweep[-1].label == "cifar_resnet20 N=channel a4"
    with pytest.raises(FGQError, match="repeat a value"):
        sweep_points(MODELS, [4, 4], [8], ["t"], ["local"])
    with pytest.raises(FGQError, match="at least one of its devices"):
        sweep_points(MODELS, [4], [8], ["t"], [])


def test_a_sweep_writes_each_point_as_it_ends_and_the_tables_and_plot(tmp_path):
    lines = []
    results = run_sweep(points(), SweepResults(tmp_path), Measure(), lines.append)
    assert [result.done for result in results] == [True, True]
    assert len((tmp_path / POINTS).read_text().splitlines()) == 2
    assert all((tmp_path / name).stat().st_size > 0 for name in OUTPUTS)
    table = list(csv.reader((tmp_path / "sweep.csv").open()))
    assert table[1][:7] == ["cifar_resnet20 N=4 a8", "llvm-znver4", "local", "1.000", "0.100",
                            "79.00", "1.00"]  # fmt: skip
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert document[1]["point"]["group_size"] == 64 and document[1]["drop"] == pytest.approx(1)
    assert (
        "| cifar_resnet20 N=64 a8 | llvm-znver4 | local | 1.000 |"
        in (tmp_path / "sweep.md").read_text()
    )
    assert lines[1].startswith("[##########----------] 1/2 points; cifar_resnet20 N=4 a8: 1.000 ms")
    assert "left" in lines[1] and "left" not in lines[-1]


def test_a_rerun_measures_only_the_points_not_done(tmp_path):
    sweep = points()
    run_sweep(sweep[:1], SweepResults(tmp_path), Measure())
    measure, lines = Measure(), []
    run_sweep(sweep, SweepResults(tmp_path), measure, lines.append)
    assert measure.asked == [sweep[1].key]
    assert lines[0] == "1 of 2 points were done before"
    assert len((tmp_path / POINTS).read_text().splitlines()) == 2


def test_a_line_cut_short_by_a_kill_is_named_and_the_point_measured_again(tmp_path):
    sweep = points()
    run_sweep(sweep, SweepResults(tmp_path), Measure())
    path = tmp_path / POINTS
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + second[:40])  # killed while appending the second point
    results = SweepResults(tmp_path)
    assert len(results.skipped) == 1 and results.skipped[0].startswith(f"{path}:2: cut short")
    measure = Measure()
    run_sweep(sweep, results, measure)
    assert measure.asked == [sweep[1].key]
    appended = path.read_text().splitlines()[2:]
    assert [json.loads(line)["point"]["group_size"] for line in appended] == [64]


def failing_first(point):
    if point.group_size == 4:
        raise FGQError("the server went away")
    return measured(point)


def test_a_failed_point_is_tried_again_recorded_with_its_reason_and_retried_by_a_rerun(tmp_path):
    lines = []
    measure = Measure(failing_first)
    results = run_sweep(points(), SweepResults(tmp_path), measure, lines.append)
    assert measure.asked == [points()[0].key] * 2 + [points()[1].key]
    assert results[0].error == "the server went away" and results[1].done
    assert "failed (the server went away); trying it again" in lines[1]
    assert "| the server went away |" in (tmp_path / "sweep.md").read_text()
    measure = Measure()
    run_sweep(points(), SweepResults(tmp_path), measure)
    assert measure.asked == [points()[0].key]
    assert all(SweepResults(tmp_path).done(point) for point in points())


def test_a_device_gone_stops_the_sweep_resumably(tmp_path):
    def gone_second(point):
        if point.group_size == 64:
            raise DeviceGone("no RPC server under key k at h:1")
        return measured(point)

    with pytest.raises(DeviceGone, match=r"k at h:1; 1 of 2 points are done in .*: run the same"):
        run_sweep(points(), SweepResults(tmp_path), Measure(gone_second))
    assert len((tmp_path / POINTS).read_text().splitlines()) == 1
    measure = Measure()
    run_sweep(points(), SweepResults(tmp_path), measure)
    assert measure.asked == [points()[1].key]
