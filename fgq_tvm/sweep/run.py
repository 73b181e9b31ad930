"""The sweep loop: measure the points not done yet, one at a time, recording each as it ends.

A point that fails is tried again (its tuning records stay in the database, so a retry goes
on from them) and, if it fails again, recorded with its reason; the sweep goes on with the
next. When a point's device is gone (:class:`DeviceGone`: no RPC server left under its key)
the sweep stops: the points done are recorded, and the same command resumes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ..errors import FGQError
from ..reporting import progress_bar
from .points import PointResult, SweepPoint
from .results import SweepResults

RETRIES = 1  # more tries of a point that failed, before its failure is recorded

Measure = Callable[[SweepPoint], PointResult]


class DeviceGone(FGQError):
    """The device of a point has nothing left to run it on; the sweep stops (resumable)."""


def run_sweep(
    points: Sequence[SweepPoint],
    results: SweepResults,
    measure: Measure,
    progress: Callable[[str], None] | None = None,
    retries: int = RETRIES,
) -> list[PointResult]:
    """Measure each of ``points`` that ``results`` has not got done, in order.

    Parameters
    ----------
    points
        The sweep's points (:func:`~fgq_tvm.sweep.points.sweep_points`).
    results
        Where results are recorded, and which points are done.
    measure
        Measures one point; raises :class:`~fgq_tvm.errors.FGQError` (one line) when it
        fails, :class:`DeviceGone` when its device is gone.
    progress
        Called with a line per point: a bar, the points done, the estimated time left.
    retries
        Further tries of a failed point.

    Returns
    -------
    list
        The results of this run, in order.

    Raises
    ------
    DeviceGone
        A point's device is gone: its message says how many points are done and how to resume.
    """
    report = progress or (lambda line: None)
    pending = [point for point in points if not results.done(point)]
    if len(pending) < len(points):
        report(f"{len(points) - len(pending)} of {len(points)} points were done before")
    measured: list[PointResult] = []
    started = time.monotonic()
    for index, point in enumerate(pending, start=1):
        report(f"point {point.key}")
        try:
            result = _measure(point, measure, retries, report)
        except DeviceGone as error:
            raise DeviceGone(
                f"{error}; {len(points) - len(pending) + index - 1} of {len(points)} points are "
                f"done in {results.folder}: run the same command to resume"
            ) from None
        results.add(result)
        results.write_outputs(points)
        measured.append(result)
        report(_progress_line(index, len(pending), len(points), time.monotonic() - started, result))
    return measured


def _measure(point: SweepPoint, measure: Measure, retries: int, report) -> PointResult:
    """``measure(point)``, tried ``1 + retries`` times; the last failure as a result."""
    start = time.monotonic()
    for attempt in range(retries + 1):
        try:
            return measure(point)
        except DeviceGone:
            raise
        except FGQError as error:
            failure = str(error)
            if attempt < retries:
                report(f"point {point.key} failed ({failure}); trying it again")
    return PointResult(point, error=failure, seconds=time.monotonic() - start)


def _progress_line(index: int, pending: int, total: int, elapsed: float, result) -> str:
    """``[####----] 3/8 points; last: ...; about 12 min left``."""
    done = total - pending + index
    outcome = f"failed: {result.error}" if result.error else _summary(result)
    left = (pending - index) * elapsed / index
    estimate = f"; about {_duration(left)} left" if index < pending else ""
    return f"{progress_bar(done, total)} points; {result.point.label}: {outcome}{estimate}"


def _summary(result: PointResult) -> str:
    drop = "" if result.drop is None else f", drop {result.drop:.2f} points"
    return f"{result.latency_ms:.3f} ms{drop}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
