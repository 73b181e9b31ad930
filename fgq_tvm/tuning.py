"""MetaSchedule tuning of the integer dot cores, and the tuned schedules ``compile`` takes.

Tasks
    One per distinct kernel of a model on an integer dot core: the layer's unscheduled PrimFunc
    (:func:`~fgq_tvm.schedules.conv2d_dot.dot_conv2d_workload`) with its epilogue, built with
    a canonical activation scale of 1.0, so that one record serves every calibration of the
    same geometry (the trace only names blocks and loops).
Space
    :func:`~fgq_tvm.schedules.conv2d_dot.schedule_dot_conv2d` with its knobs sampled (output
    columns and channel blocks per register tile), as a ``ScheduleFn``: no generic rules or
    postprocessors, since the dot tensorization is the project's own (MetaSchedule's x86 int8
    tensorization is broken in this TVM, DESIGN.md).
Search
    Evolutionary, with the XGBoost cost model; candidates built and timed on this machine.
Records
    A MetaSchedule JSON database in ``tuning_logs/<target key>/``; lines are appended, never
    rewritten.
Verification
    MetaSchedule never checks results. A measured candidate that would become its task's best
    is first run against the reference (the layer's weights, random inputs,
    :func:`~fgq_tvm.quant.layers.reference_forward` and the epilogue) and is not recorded if it
    differs in any bit. ``compile`` verifies again every schedule it takes from a database and
    keeps the default schedule for a kernel that fails (:class:`TunedSchedules`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

from .errors import FGQError
from .quant.layers import ActQuant, QuantizedLayer, reference_forward
from .relax_passes.legalize_quantized_layers import KernelSpec, kernel_arguments, layer_encoding
from .reporting import progress_bar
from .schedules.conv2d_dot import dot_conv2d_workload, schedule_dot_conv2d
from .schedules.select import DOT_CORES, build_layer
from .threads import thread_settings

SEARCH_POPULATION = 32  # the spaces hold a few dozen schedules, not the default 512
BUILD_TIMEOUT_S = 300  # a busy 2-core machine builds a candidate in seconds to minutes
Progress = Callable[[str], None]


@dataclass(frozen=True)
class KernelTask:
    """One kernel to tune: a layer on an integer dot core (``spec.core``, one of
    :data:`~fgq_tvm.schedules.select.DOT_CORES`), for one input shape, epilogue and layout."""

    spec: KernelSpec

    @property
    def name(self) -> str:
        epilogue = self.spec.epilogue.name
        return self.spec.layer.name + (f" +{epilogue}" if epilogue else "")

    def workload(self) -> tvm.IRModule:
        """The canonical unscheduled kernel: what the database's records are keyed by (the
        quantizers' scales set to 1: schedules do not depend on them)."""
        quantize = self.spec.epilogue.quantize
        spec = replace(
            self.spec,
            layer=replace(self.spec.layer, act=_unit_scale(self.spec.layer.act)),
            epilogue=replace(self.spec.epilogue, quantize=quantize and _unit_scale(quantize)),
        )
        return tvm.IRModule({"main": _workload(spec)})

    def apply(self, trace: tvm.s_tir.Trace) -> tvm.tirx.PrimFunc:
        """The layer's own kernel scheduled by ``trace`` (a record of :meth:`workload`)."""
        sch = tvm.s_tir.Schedule(_workload(self.spec))
        trace.apply_to_schedule(sch, remove_postproc=False)
        return sch.mod["main"]

    def verify(self, func: tvm.tirx.PrimFunc, target, seed: int = 0) -> bool:
        """Whether ``func`` computes the layer and its epilogue bit for bit like the reference,
        on a random input spanning the quantizer's range (and a random residual)."""
        import torch

        layer, shape, epilogue = self.spec.layer, self.spec.shape, self.spec.epilogue
        kernels = self.spec.kernels()
        stored = kernel_arguments(layer, self.spec.core)
        built = build_layer(replace(kernels, layer=func), stored, target)
        rng = np.random.default_rng(seed)
        bound = layer.act.scale * layer.act.qmax * 1.1
        low = -bound if layer.act.signed else -0.1 * bound
        x = rng.uniform(low, bound, (shape.batch, shape.in_channels, shape.height, shape.width))
        x = x.astype(np.float32)
        out_dims = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
        residual = [rng.normal(size=out_dims).astype(np.float32)] if epilogue.residual else []
        reference_input = x[:, :, 0, 0] if layer.op == "linear" else x
        expected = reference_forward(layer, torch.from_numpy(reference_input)).numpy()
        expected = epilogue.reference(expected.reshape(out_dims), *residual)
        given = layer.act.stored(x) if self.spec.quantized_input else x
        return bool(np.array_equal(built(given, *residual), expected))


def _workload(spec: KernelSpec) -> tvm.tirx.PrimFunc:
    """The unscheduled kernel of ``spec``."""
    return dot_conv2d_workload(
        spec.shape, spec.layer.act, layer_encoding(spec.layer), spec.epilogue, spec.layouts,
        spec.quantized_input, DOT_CORES[spec.core],
    )  # fmt: skip


def _unit_scale(act: ActQuant) -> ActQuant:
    return replace(act, scale=1.0)


def kernel_task(func: tvm.tirx.PrimFunc, layers: Mapping[str, QuantizedLayer]):
    """The task of a kernel PrimFunc of a lowered model (its ``fgq.*`` attributes), or
    ``None`` if it is not on a dot core."""
    spec = KernelSpec.of(func, layers)
    return KernelTask(spec) if spec is not None and spec.core in DOT_CORES else None


def kernel_tasks(mod: tvm.IRModule, layers: Mapping[str, QuantizedLayer]) -> list[KernelTask]:
    """The dot core kernels of a lowered model, one task per distinct workload, in model
    order (layers of the same geometry share a task)."""
    tasks, seen = [], set()
    for _, func in mod.functions_items():
        task = kernel_task(func, layers) if isinstance(func, tvm.tirx.PrimFunc) else None
        key = tvm_ffi.structural_hash(task.workload()) if task is not None else None
        if task is not None and key not in seen:
            seen.add(key)
            tasks.append(task)
    return tasks


def open_database(folder: Path):
    """The JSON database in ``folder`` (created if missing); records are appended.

    Raises
    ------
    FGQError
        ``folder`` cannot be created or its files are not a MetaSchedule JSON database.
    """
    from tvm.s_tir import meta_schedule as ms

    try:
        folder.mkdir(parents=True, exist_ok=True)
        return ms.database.JSONDatabase(work_dir=str(folder), module_equality="structural")
    except Exception as error:  # OSError, or TVM's errors on unreadable JSON lines
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise FGQError(
            f"cannot open the tuning database in {folder} ({type(error).__name__}: "
            f"{first_line[:200]}); fix or move it, or compile with --default-schedules"
        ) from None


@dataclass(frozen=True)
class TaskResult:
    """What tuning one task found."""

    task: KernelTask
    trials: int
    best_ms: float | None
    rejected: int


def tune(
    tasks: list[KernelTask],
    target,
    trials: int,
    folder: Path,
    progress: Progress | None = None,
    seed: int = 0,
    threads: int = 2,
) -> list[TaskResult]:
    """Tune each task for up to ``trials`` candidates, appending verified records to the
    database in ``folder``.

    Parameters
    ----------
    tasks
        From :func:`kernel_tasks`.
    target
        The :class:`tvm.target.Target` to tune for (this machine must run its code).
    trials
        Measured candidates per task (small spaces end sooner: each schedule is measured once).
    folder
        The database folder (:func:`fgq_tvm.target.database_folder`).
    progress
        Called with one line per finished task.
    seed
        Seed of the search.
    threads
        Threads the candidates run with (``TVM_NUM_THREADS``, inherited by MetaSchedule's
        runner): tune with the thread count the module will run with.
    """
    from tvm.s_tir import meta_schedule as ms

    report = progress or (lambda line: None)
    database = open_database(folder)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    results = []
    for index, task in enumerate(tasks, start=1):
        recorder = _VerifiedRecords(task, database, target)
        with tempfile.TemporaryDirectory(prefix="fgq-tune-") as work_dir, thread_settings(threads):
            ms.tune_tir(
                task.workload(),
                target,
                work_dir,
                max_trials_global=trials,
                num_trials_per_iter=min(trials, 16),
                space=ms.space_generator.ScheduleFn(
                    schedule_dot_conv2d, sch_rules=[], postprocs=[], mutator_probs={}
                ),
                builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
                runner=ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S),
                database=database,
                cost_model="xgb",
                strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=SEARCH_POPULATION, init_min_unmeasured=SEARCH_POPULATION
                ),
                measure_callbacks=[recorder, ms.measure_callback.UpdateCostModel()],
                seed=seed,
            )
        best = recorder.best_seconds
        result = TaskResult(
            task, recorder.measured, best * 1e3 if best else None, recorder.rejected
        )
        results.append(result)
        report(_progress_line(index, len(tasks), result))
    return results


def _progress_line(index: int, total: int, result: TaskResult) -> str:
    best = f"best {result.best_ms:.3f} ms" if result.best_ms is not None else "no valid schedule"
    rejected = f", {result.rejected} wrong candidates rejected" if result.rejected else ""
    bar = progress_bar(index, total)
    return f"{bar} {result.task.name}: {result.trials} trials, {best}{rejected}"


@derived_object
class _VerifiedRecords(PyMeasureCallback):
    """Commit measured candidates to the database; a would-be best only once it verifies."""

    def __init__(self, task: KernelTask, database, target) -> None:
        self.task = task
        self.database = database
        self.target = target
        self.workload = database.commit_workload(task.workload())
        top = database.get_top_k(self.workload, 1)
        self.best_seconds = mean(float(t) for t in top[0].run_secs) if top else None
        self.measured = 0
        self.rejected = 0

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        from tvm.s_tir import meta_schedule as ms

        for candidate, built, ran in zip(
            measure_candidates, builder_results, runner_results, strict=True
        ):
            if built.error_msg or ran.error_msg or not ran.run_secs:
                continue
            self.measured += 1
            seconds = mean(float(t) for t in ran.run_secs)
            trace = candidate.sch.trace
            if self.best_seconds is None or seconds < self.best_seconds:
                if not self.task.verify(self.task.apply(trace), self.target):
                    self.rejected += 1
                    continue
                self.best_seconds = seconds
            record = ms.database.TuningRecord(
                trace, self.workload, [float(t) for t in ran.run_secs], self.target,
                candidate.args_info,
            )  # fmt: skip
            self.database.commit_tuning_record(record)


class TunedSchedules:
    """The verified tuned kernels of a database, for
    :class:`~fgq_tvm.relax_passes.ApplyTunedSchedules`.

    Parameters
    ----------
    folder
        A database folder (:func:`fgq_tvm.target.database_folder`).
    target
        The target the kernels are built for.
    layers
        The model's quantized layers by name.
    """

    def __init__(self, folder: Path, target, layers: Mapping[str, QuantizedLayer]) -> None:
        self.folder = Path(folder)
        self.target = target
        self.layers = layers
        self.database = open_database(self.folder)
        self.failed: list[str] = []

    def __call__(self, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
        """The tuned, verified version of a kernel, or ``None`` (another core, no record, or
        the record fails the check: then the task's name is added to :attr:`failed`)."""
        task = kernel_task(func, self.layers)
        if task is None:
            return None
        record = self.database.query_tuning_record(task.workload(), self.target, "main")
        if record is None:
            return None
        func = task.apply(record.trace)
        if not task.verify(func, self.target):
            self.failed.append(task.name)
            return None
        return func
