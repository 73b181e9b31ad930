"""The points of a sweep and what was measured at each.

A :class:`SweepPoint` is one model at one group size and activation width, compiled for one
target and timed on one device; its :attr:`~SweepPoint.key` names it in the results file, so a
rerun with the same arguments finds the points already measured. A :class:`PointResult` is
what a point gave (or the one-line reason it failed), as one JSON object.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import FGQError


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep.

    Attributes
    ----------
    model
        The model's name (as ``fgq-tvm compile`` takes it).
    weights
        Its weights file, or ``None`` for random weights.
    group_size
        Input channels per ternary group; ``None``: all channels of a layer.
    act_bits
        Activation bits.
    target
        The target key (:func:`fgq_tvm.target.target_key`) the module is compiled for.
    device
        Where it is timed: ``"local"`` or a remote device's name (``KEY@HOST:PORT``).
    """

    model: str
    weights: str | None
    group_size: int | None
    act_bits: int
    target: str
    device: str

    @property
    def key(self) -> str:
        """A name unique to the point: ``model/N4/a8/target/device`` (and the weights' file
        name)."""
        size = "channel" if self.group_size is None else str(self.group_size)
        weights = f"[{Path(self.weights).name}]" if self.weights else ""
        return f"{self.model}{weights}/N{size}/a{self.act_bits}/{self.target}/{self.device}"

    @property
    def label(self) -> str:
        """A short label for tables and plots: ``cifar_resnet20 N=4 a8``."""
        size = "channel" if self.group_size is None else str(self.group_size)
        return f"{self.model} N={size} a{self.act_bits}"


@dataclass(frozen=True)
class PointResult:
    """What a point gave.

    Attributes
    ----------
    point
        The point.
    error
        Why it failed (one line), or ``None``: then the other fields hold its measurements.
    latency_ms, spread_ms
        Median time of one inference on the device, and the spread (max - min) of the rounds.
    module_bytes
        Size of the compiled ``.so``.
    module
        Path of the compiled module (kept for inspection and deployment).
    tuned_kernels, kernels
        Kernels with a verified tuned schedule, and kernels on a tunable core.
    float_top1, top1
        Top-1 accuracy (fractions) of the full-precision model and of the compiled module on
        the evaluation images, ``None`` where the model has no data.
    accuracy_images
        How many images the accuracy was measured on (0: none).
    seconds
        Wall time the point took (compile, tune, time, evaluate).
    """

    point: SweepPoint
    error: str | None = None
    latency_ms: float | None = None
    spread_ms: float | None = None
    module_bytes: int | None = None
    module: str | None = None
    tuned_kernels: int = 0
    kernels: int = 0
    float_top1: float | None = None
    top1: float | None = None
    accuracy_images: int = 0
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        return self.error is None

    @property
    def drop(self) -> float | None:
        """Top-1 drop in points against the full-precision model, or ``None``."""
        if self.float_top1 is None or self.top1 is None:
            return None
        return 100 * (self.float_top1 - self.top1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value: object) -> PointResult:
        """The result a :meth:`to_json` object describes.

        Raises
        ------
        ValueError
            ``value`` is not such an object.
        """
        if not isinstance(value, dict) or not isinstance(value.get("point"), dict):
            raise ValueError("not a sweep point result")
        names = {field.name for field in fields(cls)}
        point_names = {field.name for field in fields(SweepPoint)}
        if set(value) - names or set(value["point"]) != point_names:
            raise ValueError("not a sweep point result: unexpected or missing fields")
        return cls(**{**value, "point": SweepPoint(**value["point"])})


def sweep_points(
    models: Sequence[tuple[str, str | None]],
    group_sizes: Sequence[int | None],
    act_bits: Sequence[int],
    targets: Sequence[str],
    devices: Sequence[str],
) -> list[SweepPoint]:
    """Every combination, models outermost and devices innermost (the points that share a
    quantized model run one after another).

    Raises
    ------
    FGQError
        One of the lists is empty, or two points would be the same.
    """
    axes = {
        "models": models, "group sizes": group_sizes, "activation widths": act_bits,
        "targets": targets, "devices": devices,
    }  # fmt: skip
    for name, values in axes.items():
        if not values:
            raise FGQError(f"a sweep needs at least one of its {name}")
        if len(set(values)) != len(values):
            raise FGQError(f"the sweep's {name} repeat a value: {list(values)}")
    return [
        SweepPoint(model, weights, size, bits, target, device)
        for (model, weights), size, bits, target, device in itertools.product(
            models, group_sizes, act_bits, targets, devices
        )
    ]
