"""Sweeps over models, group sizes, activation widths, targets and devices (``fgq-tvm sweep``).

:mod:`.points` names the points and what each gave, :mod:`.results` records them (append-only,
resumable) and writes the tables and the plot, :mod:`.run` is the loop, :mod:`.measure`
measures one point (quantize, tune, compile, time, evaluate).
"""

from .measure import PointMeasurer, SweepSettings
from .points import PointResult, SweepPoint, sweep_points
from .results import SweepResults
from .run import DeviceGone, run_sweep

__all__ = [
    "DeviceGone",
    "PointMeasurer",
    "PointResult",
    "SweepPoint",
    "SweepResults",
    "SweepSettings",
    "run_sweep",
    "sweep_points",
]
