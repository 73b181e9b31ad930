"""Timing runtimes against each other: interleaved rounds (:func:`time_rounds`), their median
and ratios.

Used by ``fgq-tvm bench`` (:mod:`fgq_tvm.bench`), by tuning's comparison of a tuned kernel with
its default (:mod:`fgq_tvm.tuning`) and by the benchmark scripts; it imports nothing heavy.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

SETTLE_S = 0.2  # pause between runtimes, so that one runtime's spinning threads go idle
Timer = Callable[[], float]
"""One round's turn of a runtime: an untimed call, then a timed one; returns its milliseconds."""


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (the mean of the middle two for an even count).

    Parameters
    ----------
    values
        The numbers.

    Returns
    -------
    float

    Raises
    ------
    ValueError
        If ``values`` is empty.
    """
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or ``reference`` is not positive.

    Parameters
    ----------
    value, reference
        The numbers, or None where one is unknown.

    Returns
    -------
    float or None
    """
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def time_rounds(
    runs: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    settle_s: float = SETTLE_S,
    timers: Mapping[str, Timer] | None = None,
) -> dict[str, list[float]]:
    """Times in milliseconds of ``repeats`` calls of each of ``runs``, interleaved.

    After ``warmup`` untimed calls of each, every one of ``repeats`` rounds gives each runtime
    in turn a pause of ``settle_s`` (the previous runtime's spinning threads go idle), one
    untimed call (caches warm again) and one timed call, timed by the wall clock here unless
    ``timers`` has the runtime. A slow drift of the machine's speed (a neighbour on the host)
    then hits every runtime alike, and their ratios stay fair.

    Parameters
    ----------
    runs
        The runtimes by name: each call runs one inference.
    repeats
        Timed calls of each.
    warmup
        Untimed calls of each first.
    settle_s
        Pause before each runtime's turn in a round, in seconds.
    timers
        For the runtimes the wall clock here cannot time (those on a remote device), their
        :data:`Timer`: one untimed and one timed call, the latter's milliseconds returned.

    Returns
    -------
    dict of str to list of float
        Each runtime's ``repeats`` times, in milliseconds, in round order.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    timers = {name: (timers or {}).get(name) or _wall_timer(run) for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, timer in timers.items():
            time.sleep(settle_s)
            times[name].append(timer())
    return times


def _wall_timer(run: Callable[[], object]) -> Timer:
    """The :data:`Timer` of ``run`` by this machine's clock."""

    def timer() -> float:
        run()
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3

    return timer
