"""One point of a sweep, measured: quantize, tune, compile, time on the device, evaluate.

:class:`PointMeasurer` does for a point what ``fgq-tvm tune``, ``compile``, ``bench`` and
``eval --backend tvm`` do one after another:

1. quantize the model as compile would (the settings given, the others defaulting by the
   calibration data); the points of one model, group size and width that follow each other
   share the quantized network;
2. tune its kernels into ``tuning_logs/<target key>`` for up to the trials asked (a search that
   finished before is not run again), candidates timed on the point's device;
3. compile the module with the verified tuned schedules into ``modules/``;
4. time it on the device (:func:`~fgq_tvm.timing.time_rounds`; the device's own clock when it
   is remote);
5. where evaluation images are given: compile the same network for this machine at the
   evaluation batch and measure the top-1 of the module against the full-precision model. The
   integer arithmetic is the same on every target (the modules are bit-identical to the
   PyTorch reference), so one evaluation serves the points of every target and device.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..bench import timed_input
from ..compiler import compile_quantized, lower_to_relax, quantize
from ..data import LabelledImages
from ..defaults import quantization_inputs
from ..errors import FGQError
from ..evaluate import evaluate_quantized_model
from ..models import build_model
from ..reporting import output_folder
from ..target import database_folder, host_target, parse_target
from ..timing import median, time_rounds
from ..tuning import kernel_tasks, tune
from .points import PointResult, SweepPoint
from .run import DeviceGone

MODULES = "modules"  # the compiled modules, in the sweep's folder


@dataclass(frozen=True)
class SweepSettings:
    """What every point shares.

    Attributes
    ----------
    quant_fields
        The :class:`~fgq_tvm.config.QuantConfig` fields given (group size and activation bits
        are the point's); the others default by the calibration data.
    calib, calib_split, calib_images
        The calibration images (as for ``fgq-tvm compile``).
    trials
        Tuning trials per kernel (0: default schedules, and the records tuned before).
    tuning_logs
        The folder of tuning databases.
    rounds, warmup
        Timed and untimed inferences on the device.
    threads
        Threads of the candidates timed while tuning on this machine.
    """

    quant_fields: Mapping[str, object]
    calib: str | None
    calib_split: str
    calib_images: int | None
    trials: int
    tuning_logs: Path
    rounds: int = 20
    warmup: int = 3
    threads: int = 2


class PointMeasurer:
    """Measures points (call it with one) into ``folder``.

    Parameters
    ----------
    settings
        What every point shares.
    targets
        The point's target key -> its :class:`tvm.target.Target`.
    devices
        The point's device name -> its device (:data:`fgq_tvm.remote.LOCAL_DEVICE` or a
        :class:`~fgq_tvm.remote.RemoteDevice`).
    images
        The model name -> its labelled evaluation images (models without are not evaluated).
    folder
        The sweep's folder; modules go to its ``modules/``.
    progress
        Called with a line per stage.
    """

    def __init__(
        self,
        settings: SweepSettings,
        targets: Mapping[str, object],
        devices: Mapping[str, object],
        images: Mapping[str, LabelledImages],
        folder: Path,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.targets = targets
        self.devices = devices
        self.images = images
        self.folder = folder
        self.report = progress or (lambda line: None)
        self._quantized: tuple[tuple, tuple] | None = None  # (key, (quantized, model, spec))
        self._accuracy: dict[tuple, tuple[float, float, int]] = {}

    def __call__(self, point: SweepPoint) -> PointResult:
        start = time.monotonic()
        device = self.devices[point.device]
        _check_device(device)
        target = self.targets[point.target]
        quantized, model, spec = self._quantize(point)
        lowered = lower_to_relax(quantized, spec.input_shape, target)
        tasks = kernel_tasks(lowered, quantized.layers, target)
        folder = database_folder(target, self.settings.tuning_logs)
        tuned = tune(
            tasks, target, self.settings.trials, folder, self.report, threads=self.settings.threads,
            device=device,
        )  # fmt: skip
        module = output_folder(self.folder / MODULES) / f"{_file_name(point.key)}.so"
        compile_quantized(quantized, spec, target, module, self.report, self.settings.tuning_logs)
        times = self._time(device, module, spec)
        float_top1, top1, evaluated = self._evaluate(point, quantized, model, spec)
        return PointResult(
            point,
            latency_ms=median(times),
            spread_ms=max(times) - min(times),
            module_bytes=module.stat().st_size,
            module=str(module),
            tuned_kernels=sum(result.best_ms is not None for result in tuned),
            kernels=len(tasks),
            float_top1=float_top1,
            top1=top1,
            accuracy_images=evaluated,
            seconds=time.monotonic() - start,
        )

    def _quantize(self, point: SweepPoint):
        """The point's quantized network (the last one again if it is the same)."""
        key = (point.model, point.weights, point.group_size, point.act_bits)
        if self._quantized is not None and self._quantized[0] == key:
            return self._quantized[1]
        model, spec = build_model(point.model, point.weights)
        model.eval()
        point_fields = {"group_size": point.group_size, "act_bits": point.act_bits}
        given = {**self.settings.quant_fields, **point_fields}
        settings = self.settings
        inputs = quantization_inputs(
            model, spec, given, settings.calib, settings.calib_split, settings.calib_images
        )
        for line in inputs.warnings:
            self.report(f"warning: {line}")
        quantized = quantize(model, spec, inputs.quant, inputs.calibration, self.report)
        self._quantized = (key, (quantized, model, spec))
        return self._quantized[1]

    def _time(self, device, module: Path, spec) -> list[float]:
        """Milliseconds of each timed inference of ``module`` on ``device``."""
        self.report(f"time {module.name} on {device.name}")
        with device.session() as session:
            loaded = session.load_model(module, timed_input(spec))
            timers = {"module": loaded.timer} if loaded.timer else None
            times = time_rounds(
                {"module": loaded.run}, self.settings.rounds, self.settings.warmup, timers=timers
            )
        return times["module"]

    def _evaluate(self, point: SweepPoint, quantized, model, spec):
        """``(float top-1, module top-1, images)`` of the point's network; ``(None, None, 0)``
        for a model without evaluation images."""
        images = self.images.get(point.model)
        if images is None:
            return None, None, 0
        key = (point.model, point.weights, point.group_size, point.act_bits)
        if key not in self._accuracy:
            self.report(f"evaluate {point.label} on {images.count} images")
            evaluation = evaluate_quantized_model(
                quantized, model, spec, images, backend="tvm",
                target=parse_target(host_target()), progress=self.report,
            )  # fmt: skip
            result = evaluation.result
            top1 = (result.full_precision.top1, result.quantized.top1, images.count)
            self._accuracy[key] = top1
        return self._accuracy[key]


def _check_device(device) -> None:
    """Raise :class:`DeviceGone` if the device has nothing left to run on (no RPC server)."""
    try:
        device.check()
    except FGQError as error:
        raise DeviceGone(str(error)) from None


def _file_name(key: str) -> str:
    """A point's key as a file name."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key).strip("_")
