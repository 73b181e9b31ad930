"""Which core computes a layer, by measurement: the records ``tune`` appends and ``compile`` reads.

Where several cores could compute a layer in one another's place
(:func:`~fgq_tvm.schedules.select.interchangeable_cores`: on the target, the same layouts,
activation bytes alike; an AMX host's ``int8-amx`` and ``int8-dot-vnni``), the first in the
list of cores is not always the fastest: a small layer may waste a large core's tiles.
``fgq-tvm tune`` times each candidate's kernel of every tuned layer in the same interleaved
rounds (:func:`fgq_tvm.tuning.measure_cores`), and appends the medians as one JSON line of
:data:`CHOICES` beside the tuning database: lines are appended, never rewritten.

``compile`` with that database (:class:`~fgq_tvm.tuning.TunedSchedules`) puts each layer on
the fastest core of the latest line for it (a layer is named by
:func:`~fgq_tvm.schedules.select.layer_key`: its geometry, activation bits and sign, weight
encoding), where that core can still take the first one's place; the compile summary's core
column and the sidecar say which core each layer got.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .jsonlines import JSONLines
from .remote import LOCAL_DEVICE

CHOICES = "core_choices.json"  # beside the tuning database, one JSON line per measurement


@dataclass(frozen=True)
class CoreTimes:
    """One layer's kernel on each candidate core, timed in the same interleaved rounds.

    Attributes
    ----------
    layer
        :func:`~fgq_tvm.schedules.select.layer_key` of the layer.
    times_ms
        The median milliseconds of each core's kernel, by core name.
    device
        Where they were timed: ``"local"`` (this machine) or a remote device's name.
    failed
        The cores whose kernel failed the check against the reference (never chosen).
    """

    layer: str
    times_ms: dict[str, float] = field(default_factory=dict)
    device: str = LOCAL_DEVICE.name
    failed: list[str] = field(default_factory=list)

    @property
    def fastest(self) -> str:
        """The core of the smallest median."""
        return min(self.times_ms, key=self.times_ms.__getitem__)

    def summary(self) -> str:
        """``core a ms, core b ms: fastest``, the fastest first (and the cores that failed
        the check)."""
        ranked = sorted(self.times_ms, key=self.times_ms.__getitem__)
        times = ", ".join(f"{core} {self.times_ms[core]:.3f} ms" for core in ranked)
        failed = f" ({', '.join(self.failed)}: failed the check)" if self.failed else ""
        return f"{times}: {self.fastest}{failed}"


def append_core_times(folder: Path, times: CoreTimes) -> None:
    """Add ``times`` as one JSON line to the folder's :data:`CHOICES` file."""
    JSONLines(Path(folder) / CHOICES).append(vars(times))


def load_core_choices(folder: Path, skipped: list[str] | None = None) -> dict[str, str]:
    """The fastest core of the latest measurement of each layer in ``folder`` (none without
    the file), by layer key; ``file:line: reason`` of each unreadable line is added to
    ``skipped``."""
    skipped = [] if skipped is None else skipped
    path = Path(folder) / CHOICES
    choices = {}
    for number, fields in JSONLines(path).read(skipped):
        try:
            times = CoreTimes(**fields)
            choices[times.layer] = times.fastest
        except (TypeError, ValueError, AttributeError) as error:
            skipped.append(f"{path}:{number}: not a measurement of cores ({error})")
    return choices
