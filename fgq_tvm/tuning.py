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
Comparison
    MetaSchedule times each candidate once, whenever it comes up: on a machine whose speed
    drifts, a tile measured in a fast minute can beat a better one measured in a slow minute.
    After its search, each task's best record is timed against the default schedule in the
    same interleaved rounds, and the verdict is appended to ``default_comparisons.json`` beside
    the database (``--trials 0``: only this, for every task with a record). ``compile`` takes a
    tuned record only where its latest verdict says it beats the default (or where it was never
    compared: databases from before the comparisons).
Verification
    MetaSchedule never checks results. A measured candidate that would become its task's best
    is first run against the reference (the layer's weights, random inputs,
    :func:`~fgq_tvm.quant.layers.reference_forward` and the epilogue) and is not recorded if it
    differs in any bit. ``compile`` verifies again every schedule it takes from a database and
    keeps the default schedule for a kernel that fails (:class:`TunedSchedules`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean, median

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

COMPARISONS = "default_comparisons.json"  # beside MetaSchedule's files, one JSON line each
COMPARISON_ROUNDS = 20
SEARCH_POPULATION = 32  # the spaces hold a few dozen schedules, not the default 512
BUILD_TIMEOUT_S = 300  # a busy 2-core machine builds a candidate in seconds to minutes
SEARCH_LOGGER = "fgq_tvm.tuning.search"  # where MetaSchedule's messages during a search go
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
        x, residual = self._random_inputs(seed)
        reference_input = x[:, :, 0, 0] if layer.op == "linear" else x
        expected = reference_forward(layer, torch.from_numpy(reference_input)).numpy()
        out_dims = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
        expected = epilogue.reference(expected.reshape(out_dims), *residual)
        given = layer.act.stored(x) if self.spec.quantized_input else x
        return bool(np.array_equal(self._built(func, target)(given, *residual), expected))

    def runner(self, func: tvm.tirx.PrimFunc, target) -> Callable[[], object]:
        """A call of ``func`` (built for ``target``, weights packed) on a fixed random input;
        ``func`` may come from any core's :meth:`~KernelSpec.kernels` of the same spec."""
        x, residual = self._random_inputs(0)
        given = self.spec.layer.act.stored(x) if self.spec.quantized_input else x
        built = self._built(func, target)
        arguments = built.arguments(given, *residual)
        return lambda: built.module["main"](*arguments)

    def _built(self, func: tvm.tirx.PrimFunc, target):
        kernels = replace(self.spec.kernels(), layer=func)
        return build_layer(kernels, kernel_arguments(self.spec.layer, self.spec.core), target)

    def _random_inputs(self, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """``x`` uniform over the quantizer's range and a little beyond; the residual (if the
        epilogue adds one) standard normal."""
        layer, shape = self.spec.layer, self.spec.shape
        rng = np.random.default_rng(seed)
        bound = layer.act.scale * layer.act.qmax * 1.1
        low = -bound if layer.act.signed else -0.1 * bound
        x = rng.uniform(low, bound, (shape.batch, shape.in_channels, shape.height, shape.width))
        out_dims = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
        residual = (
            [rng.normal(size=out_dims).astype(np.float32)] if self.spec.epilogue.residual else []
        )
        return x.astype(np.float32), residual


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
class Comparison:
    """A task's best record timed against its default schedule in the same interleaved rounds
    (:func:`fgq_tvm.bench.time_rounds`): medians in milliseconds.

    ``workload`` and ``trace`` are hashes of the task's workload and of the record's trace.
    """

    workload: str
    trace: str
    tuned_ms: float
    default_ms: float

    @property
    def tuned_wins(self) -> bool:
        return self.tuned_ms < self.default_ms


def record_key(task: KernelTask, record) -> tuple[str, str]:
    """``(workload hash, trace hash)`` of a task's tuning record, as comparisons name them."""
    workload = tvm_ffi.structural_hash(task.workload()) & (2**64 - 1)
    return f"{workload:016x}", hashlib.sha256(str(record.trace).encode()).hexdigest()[:16]


def compare_with_default(task: KernelTask, record, target) -> Comparison:
    """Time ``record``'s kernel against the task's default kernel, interleaved."""
    from .bench import time_rounds

    runs = {
        "tuned": task.runner(task.apply(record.trace), target),
        "default": task.runner(task.spec.kernels().layer, target),
    }
    times = time_rounds(runs, COMPARISON_ROUNDS, warmup=3, settle_s=0.0)
    return Comparison(*record_key(task, record), median(times["tuned"]), median(times["default"]))


def append_comparison(folder: Path, comparison: Comparison) -> None:
    """Add ``comparison`` as one JSON line to the folder's :data:`COMPARISONS` file."""
    try:
        with open(folder / COMPARISONS, "a") as file:
            file.write(json.dumps(vars(comparison)) + "\n")
    except OSError as error:
        raise FGQError(f"cannot write {folder / COMPARISONS} ({error.strerror})") from None


def load_comparisons(folder: Path) -> dict[tuple[str, str], Comparison]:
    """The latest comparison of each (workload, trace) in ``folder`` (none without the file).

    Raises
    ------
    FGQError
        A line is not a comparison.
    """
    path = folder / COMPARISONS
    comparisons = {}
    if not path.is_file():
        return comparisons
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            comparison = Comparison(**json.loads(line))
        except (ValueError, TypeError) as error:
            raise FGQError(
                f"{path}, line {number}, is no comparison ({error}); fix or remove the line"
            ) from None
        comparisons[comparison.workload, comparison.trace] = comparison
    return comparisons


@dataclass(frozen=True)
class TaskResult:
    """What tuning one task found, and how its best record compared with the default."""

    task: KernelTask
    trials: int
    best_ms: float | None
    rejected: int
    comparison: Comparison | None = None


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
        Measured candidates per task (small spaces end sooner: each schedule is measured once);
        0 only compares the database's best records with the defaults.
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

    report = progress or (lambda line: None)
    database = open_database(folder)
    results = []
    for index, task in enumerate(tasks, start=1):
        recorder = _VerifiedRecords(task, database, target)
        with thread_settings(threads):
            if trials > 0:
                _search(task, target, trials, database, recorder, seed)
            record = database.query_tuning_record(task.workload(), target, "main")
            comparison = compare_with_default(task, record, target) if record else None
        if comparison is not None:
            append_comparison(folder, comparison)
        best = recorder.best_seconds
        result = TaskResult(
            task, recorder.measured, best * 1e3 if best else None, recorder.rejected, comparison
        )
        results.append(result)
        report(_progress_line(index, len(tasks), result))
    return results


def _search(task: KernelTask, target, trials: int, database, recorder, seed: int) -> None:
    """MetaSchedule's evolutionary search over the task's schedule space."""
    from tvm.s_tir import meta_schedule as ms

    space = ms.space_generator.ScheduleFn(
        schedule_dot_conv2d, sch_rules=[], postprocs=[], mutator_probs={}
    )
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=SEARCH_POPULATION, init_min_unmeasured=SEARCH_POPULATION
    )
    context = search_context(task.workload(), target, "main", space, strategy, seed)
    callbacks = [recorder, ms.measure_callback.UpdateCostModel()]
    run_search(context, trials, database, callbacks)


def search_context(workload: tvm.IRModule, target, name: str, space, strategy, seed: int):
    """A MetaSchedule task (``TuneContext``) of ``workload`` that logs to :data:`SEARCH_LOGGER`.

    MetaSchedule's own ways to make one (``tune_tir``, ``tune_relax``,
    ``extracted_tasks_to_tune_contexts``) reconfigure the whole process's logging with
    ``logging.config.dictConfig``: that closes every handler in the process, and fails on a
    handler without a name on MetaSchedule's logger (pytest 9.2 adds one to each logger that
    does not propagate). A search must neither depend on nor change how the application that
    runs it configured logging, so it gets a plain logger: MetaSchedule's messages propagate to
    the application's handlers (warnings and above only, unless the application asks for more).
    """
    from tvm.s_tir import meta_schedule as ms

    return ms.TuneContext(
        mod=workload,
        target=target,
        space_generator=space,
        search_strategy=strategy,
        task_name=name,
        rand_state=ms.utils.fork_seed(seed, n=1)[0],
        logger=logging.getLogger(SEARCH_LOGGER),
    ).clone()


def run_search(context, trials: int, database, measure_callbacks="default") -> None:
    """Measure up to ``trials`` candidates of the task ``context`` (:func:`search_context`) on
    this machine, committing them to ``database`` through ``measure_callbacks``."""
    from tvm.s_tir import meta_schedule as ms

    with tempfile.TemporaryDirectory(prefix="fgq-tune-") as work_dir:
        ms.tune.tune_tasks(
            tasks=[context],
            task_weights=[1.0],
            work_dir=work_dir,
            max_trials_global=trials,
            num_trials_per_iter=min(trials, 16),
            builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
            runner=ms.runner.LocalRunner(timeout_sec=BUILD_TIMEOUT_S),
            database=database,
            cost_model="xgb",
            measure_callbacks=measure_callbacks,
        )


def _progress_line(index: int, total: int, result: TaskResult) -> str:
    best = f"best {result.best_ms:.3f} ms" if result.best_ms is not None else "no valid schedule"
    rejected = f", {result.rejected} wrong candidates rejected" if result.rejected else ""
    comparison = result.comparison
    if comparison is not None:
        verdict = "tuned kept" if comparison.tuned_wins else "default kept"
        rejected += (
            f"; same rounds: tuned {comparison.tuned_ms:.3f} ms, default "
            f"{comparison.default_ms:.3f} ms: {verdict}"
        )
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
        self.comparisons = load_comparisons(self.folder)
        self.failed: list[str] = []
        self.slower: list[str] = []

    def __call__(self, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
        """The tuned, verified version of a kernel, or ``None``: another core, no record, a
        record slower than the default in its latest comparison (the task's name is added to
        :attr:`slower`), or one that fails the check (added to :attr:`failed`)."""
        task = kernel_task(func, self.layers)
        if task is None:
            return None
        record = self.database.query_tuning_record(task.workload(), self.target, "main")
        if record is None:
            return None
        comparison = self.comparisons.get(record_key(task, record))
        if comparison is not None and not comparison.tuned_wins:
            self.slower.append(task.name)
            return None
        func = task.apply(record.trace)
        if not task.verify(func, self.target):
            self.failed.append(task.name)
            return None
        return func
