"""MetaSchedule tuning of the tunable cores' kernels, and the tuned schedules ``compile`` takes.

Tasks
    One per distinct kernel of a model on a tunable core
    (:attr:`~fgq_tvm.schedules.core.Core.tunable`: the integer dot cores): the layer's
    unscheduled PrimFunc (the core's :meth:`~fgq_tvm.schedules.core.Core.workload`) with its
    epilogue, built with a canonical activation scale of 1.0, so that one record serves every
    calibration of the same geometry (the trace only names blocks and loops).
Space
    The core's :meth:`~fgq_tvm.schedules.core.Core.schedule`, which samples its knobs (for the
    dot cores, output columns and channel blocks per register tile), as a ``ScheduleFn``: no
    generic rules or postprocessors, since the dot tensorization is the project's own
    (MetaSchedule's x86 int8 tensorization is broken in this TVM, DESIGN.md).
Search
    Evolutionary, with the XGBoost cost model; candidates built on this machine and timed on
    it, or on the servers of a :class:`~fgq_tvm.remote.RemoteDevice` (MetaSchedule's RPC
    runner), which then also runs the verification and the comparison below.
Records
    A MetaSchedule JSON database in ``tuning_logs/<target key>/``
    (:mod:`fgq_tvm.tuning_database`); lines are appended, never rewritten.
Resuming
    A task whose search finished is noted in ``finished_searches.json`` beside the database (its
    workload and trials); a rerun with no more trials skips it, and a search never proposes a
    schedule the database measured already (MetaSchedule's evolutionary search would: it only
    remembers what it measured itself), so a tune killed half way resumes where it stopped.
Temporaries and interrupts
    A search keeps its temporary files, its worker processes' included, in
    ``<temp dir>/fgq-tune-<process id>``, removed when it ends; the next search removes those
    of processes that no longer run (killed ones). Ctrl-C kills a search's worker processes,
    ends the search and raises ``KeyboardInterrupt`` once MetaSchedule's worker pools are shut
    down; nothing the workers print on the way reaches stderr.
Comparison
    MetaSchedule times each candidate once, whenever it comes up: on a machine whose speed
    drifts, a tile measured in a fast minute can beat a better one measured in a slow minute.
    After its search, each task's best record is timed against the default schedule in the
    same interleaved rounds, and the verdict is appended to ``default_comparisons.json`` beside
    the database (``--trials 0``: only this, for every task with a record), with the remote
    device that timed it, if any. ``compile`` takes a tuned record only where its latest
    verdict says it beats the default (or where it was never compared: databases from before
    the comparisons).
Cores
    Where several tunable cores could compute a layer in one another's place (an AMX host's
    AMX and VNNI cores), the layer's kernel is a task on each (:func:`kernel_tasks` with a
    target). After the searches, each core's kernel, as ``compile`` would build it and checked
    against the reference, is timed in the same interleaved rounds, once per layer, and the
    medians are appended to ``core_choices.json`` beside the database; ``compile`` puts the
    layer on the fastest (:mod:`fgq_tvm.core_choices`). A rerun measures again the layers of
    the tasks it searches, and those not measured yet.
Verification
    MetaSchedule never checks results. A measured candidate that would become its task's best
    is first run against the reference (the layer's weights, random inputs,
    :func:`~fgq_tvm.quant.layers.reference_forward` and the epilogue) and is not recorded if it
    differs in any bit. ``compile`` verifies again every schedule it takes from a database and
    keeps the default schedule for a kernel that fails (:class:`TunedSchedules`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean, median

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

from .core_choices import CoreTimes, append_core_times, load_core_choices
from .errors import FGQError
from .jsonlines import JSONLines
from .quant.layers import ActQuant, QuantizedLayer, reference_forward
from .remote import LOCAL, LOCAL_DEVICE, Call, Device, Session
from .reporting import progress_bar
from .schedules.kernel_spec import KernelSpec, kernel_arguments, layer_encoding
from .schedules.select import build_layer, core_named, interchangeable_cores, layer_key
from .schedules.tvmscript_parsing import import_tensor_intrinsics
from .threads import thread_settings
from .timing import time_rounds
from .tuning_database import TuningDatabase, open_database, skipped_warning

COMPARISONS = "default_comparisons.json"  # beside MetaSchedule's files, one JSON line each
FINISHED = "finished_searches.json"  # beside them too: {"workload": ..., "trials": ...} lines
TEMPORARIES = "fgq-tune-"  # + the process id: a search's folder in the temporary directory
TUNE_REMEDY = "fix or move it, or tune into another --tuning-logs DIR"
COMPILE_REMEDY = "fix or move it, or compile with --default-schedules"
COMPARISON_ROUNDS = 20
SEARCH_POPULATION = 32  # the spaces hold a few dozen schedules, not the default 512
BUILD_TIMEOUT_S = 300  # a busy 2-core machine builds a candidate in seconds to minutes
SEARCH_LOGGER = "fgq_tvm.tuning.search"  # where MetaSchedule's messages during a search go
Progress = Callable[[str], None]


@dataclass(frozen=True)
class KernelTask:
    """One kernel to tune: a layer on a tunable core (``spec.core``), for one input shape,
    epilogue and layout."""

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
        return tvm.IRModule({"main": spec.workload()})

    def apply(self, trace: tvm.s_tir.Trace) -> tvm.tirx.PrimFunc:
        """The layer's own kernel scheduled by ``trace`` (a record of :meth:`workload`)."""
        sch = tvm.s_tir.Schedule(self.spec.workload())
        trace.apply_to_schedule(sch, remove_postproc=False)
        return sch.mod["main"]

    def verify(
        self, func: tvm.tirx.PrimFunc, target, seed: int = 0, session: Session = LOCAL
    ) -> bool:
        """Whether ``func``, run on ``session`` (:mod:`fgq_tvm.remote`), computes the layer and
        its epilogue bit for bit like the reference, on a random input spanning the
        quantizer's range (and a random residual)."""
        import torch

        layer, shape, epilogue = self.spec.layer, self.spec.shape, self.spec.epilogue
        x, residual = self._random_inputs(seed)
        reference_input = x[:, :, 0, 0] if layer.op == "linear" else x
        expected = reference_forward(layer, torch.from_numpy(reference_input)).numpy()
        out_dims = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
        expected = epilogue.reference(expected.reshape(out_dims), *residual)
        given = layer.act.stored(x) if self.spec.quantized_input else x
        built = self._built(func, target, session)
        return bool(np.array_equal(built(given, *residual), expected))

    def runner(self, func: tvm.tirx.PrimFunc, target, session: Session = LOCAL) -> Call:
        """A call of ``func`` (built for ``target``, weights packed, loaded on ``session``) on
        a fixed random input; ``func`` may come from any core's :meth:`~KernelSpec.kernels`
        of the same spec."""
        x, residual = self._random_inputs(0)
        given = self.spec.layer.act.stored(x) if self.spec.quantized_input else x
        built = self._built(func, target, session)
        return Call(built.module, tuple(built.arguments(given, *residual)))

    def _built(self, func: tvm.tirx.PrimFunc, target, session: Session):
        kernels = replace(self.spec.kernels(), layer=func)
        stored = kernel_arguments(self.spec.layer, self.spec.core)
        return build_layer(kernels, stored, target, session)

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


def _unit_scale(act: ActQuant) -> ActQuant:
    return replace(act, scale=1.0)


def kernel_task(func: tvm.tirx.PrimFunc, layers: Mapping[str, QuantizedLayer]):
    """The task of a kernel PrimFunc of a lowered model (its ``fgq.*`` attributes), or
    ``None`` if it is not on a tunable core."""
    spec = KernelSpec.of(func, layers)
    return KernelTask(spec) if spec is not None and core_named(spec.core).tunable else None


def kernel_tasks(
    mod: tvm.IRModule, layers: Mapping[str, QuantizedLayer], target=None
) -> list[KernelTask]:
    """The tunable cores' kernels of a lowered model, one task per distinct workload, in model
    order (layers of the same geometry share a task); with ``target``, each followed by the
    same kernel on the other tunable cores that could take its core's place there
    (:func:`~fgq_tvm.schedules.select.interchangeable_cores`), so that the cores
    :func:`measure_cores` compares are all tuned."""
    tasks, seen = [], set()
    for _, func in mod.functions_items():
        task = kernel_task(func, layers) if isinstance(func, tvm.tirx.PrimFunc) else None
        for candidate in _on_each_core(task, target) if task is not None else []:
            key = tvm_ffi.structural_hash(candidate.workload())
            if key not in seen:
                seen.add(key)
                tasks.append(candidate)
    return tasks


def _on_each_core(task: KernelTask, target) -> list[KernelTask]:
    """``task``, then its kernel on the other tunable cores that could take its core's place
    on ``target`` (none without a target)."""
    if target is None:
        return [task]
    spec = task.spec
    others = [c for c in _interchangeable(spec, target) if c != spec.core and core_named(c).tunable]
    return [task, *(KernelTask(replace(spec, core=core)) for core in others)]


@dataclass(frozen=True)
class Comparison:
    """A task's best record timed against its default schedule in the same interleaved rounds
    (:func:`fgq_tvm.timing.time_rounds`): medians in milliseconds.

    ``workload`` and ``trace`` are hashes of the task's workload and of the record's trace;
    ``device`` names where they were timed (:attr:`fgq_tvm.remote.RemoteDevice.name`, or
    ``"local"``: this machine, which lines written by a local tune leave out).
    """

    workload: str
    trace: str
    tuned_ms: float
    default_ms: float
    device: str = LOCAL_DEVICE.name

    @property
    def tuned_wins(self) -> bool:
        return self.tuned_ms < self.default_ms


def workload_key(task: KernelTask) -> str:
    """The hash of a task's workload, as comparisons and finished searches name it."""
    return f"{tvm_ffi.structural_hash(task.workload()) & (2**64 - 1):016x}"


def record_key(task: KernelTask, record) -> tuple[str, str]:
    """``(workload hash, trace hash)`` of a task's tuning record, as comparisons name them."""
    return workload_key(task), hashlib.sha256(str(record.trace).encode()).hexdigest()[:16]


def compare_with_default(
    task: KernelTask, record, target, device: Device = LOCAL_DEVICE
) -> Comparison:
    """Time ``record``'s kernel against the task's default kernel, interleaved, on ``device``."""
    with device.session() as session:
        funcs = {"tuned": task.apply(record.trace), "default": task.spec.kernels().layer}
        calls = {name: task.runner(func, target, session) for name, func in funcs.items()}
        times = time_rounds(
            calls, COMPARISON_ROUNDS, warmup=3, settle_s=0.0, timers=session.timers(calls)
        )
    tuned, default = median(times["tuned"]), median(times["default"])
    return Comparison(*record_key(task, record), tuned, default, device.name)


def append_comparison(folder: Path, comparison: Comparison) -> None:
    """Add ``comparison`` as one JSON line to the folder's :data:`COMPARISONS` file (without
    ``device`` where it is local, as before remote tuning)."""
    fields = vars(comparison)
    if comparison.device == LOCAL_DEVICE.name:
        fields = {name: value for name, value in fields.items() if name != "device"}
    _append_line(folder / COMPARISONS, fields)


def load_comparisons(
    folder: Path, skipped: list[str] | None = None
) -> dict[tuple[str, str], Comparison]:
    """The latest comparison of each (workload, trace) in ``folder`` (none without the file);
    ``file:line: reason`` of each unreadable line is added to ``skipped``."""
    comparisons = {}
    for comparison in _read_lines(folder / COMPARISONS, "comparison", Comparison, skipped):
        comparisons[comparison.workload, comparison.trace] = comparison
    return comparisons


@dataclass(frozen=True)
class FinishedSearch:
    """A search of ``trials`` candidates that ended, on the workload hashed ``workload``."""

    workload: str
    trials: int


def load_finished(folder: Path, skipped: list[str] | None = None) -> dict[str, int]:
    """The most trials a search of each workload finished with, from the folder's
    :data:`FINISHED` file (none without it); ``file:line: reason`` of each unreadable line is
    added to ``skipped``."""
    finished: dict[str, int] = {}
    for search in _read_lines(folder / FINISHED, "finished search", FinishedSearch, skipped):
        finished[search.workload] = max(search.trials, finished.get(search.workload, 0))
    return finished


def _append_line(path: Path, fields: dict) -> None:
    """Add ``fields`` as one JSON line to ``path`` (:class:`~fgq_tvm.jsonlines.JSONLines`)."""
    JSONLines(path).append(fields)


def _read_lines(path: Path, what: str, kind: type, skipped: list[str] | None) -> list:
    """``kind(**fields)`` of each line of ``path`` (none if it is missing); the others are
    named in ``skipped`` (a tune killed while appending leaves a line cut short)."""
    skipped = [] if skipped is None else skipped
    values = []
    for number, fields in JSONLines(path).read(skipped):
        try:
            values.append(kind(**fields))
        except TypeError as error:
            skipped.append(f"{path}:{number}: not a {what} ({error})")
    return values


@dataclass(frozen=True)
class TaskResult:
    """What tuning one task found, and how its best record compared with the default.

    ``trials`` counts the candidates this run measured, ``earlier`` the task's records the
    database held before it; ``skipped``: a finished search (or the records) covered the trials
    asked for, so the task was neither searched nor compared. ``cores``: the layer's kernel on
    each core that could compute it, timed after the searches (:func:`measure_cores`).
    """

    task: KernelTask
    trials: int
    best_ms: float | None
    rejected: int
    comparison: Comparison | None = None
    earlier: int = 0
    skipped: bool = False
    cores: CoreTimes | None = None


def tune(
    tasks: list[KernelTask],
    target,
    trials: int,
    folder: Path,
    progress: Progress | None = None,
    seed: int = 0,
    threads: int = 2,
    device: Device = LOCAL_DEVICE,
) -> list[TaskResult]:
    """Tune each task for up to ``trials`` candidates, appending verified records to the
    database in ``folder``; tasks whose search finished with at least ``trials`` trials (or
    with as many records) are skipped, and a search measures only schedules the database has
    no record of.

    Parameters
    ----------
    tasks
        From :func:`kernel_tasks`.
    target
        The :class:`tvm.target.Target` to tune for (``device`` must run its code).
    trials
        Measured candidates per task, those of earlier runs included (small spaces end sooner:
        each schedule is measured once); 0 only compares the database's best records with the
        defaults.
    folder
        The database folder (:func:`fgq_tvm.target.database_folder`).
    progress
        Called with a warning about unreadable database lines, and one line per task.
    seed
        Seed of the search.
    threads
        Threads the candidates run with (``TVM_NUM_THREADS``, inherited by MetaSchedule's
        local runner): tune with the thread count the module will run with. A remote device
        runs the count its servers were started with.
    device
        Where candidates are timed, verified and compared with the defaults: this machine or
        a :class:`~fgq_tvm.remote.RemoteDevice`.

    Raises
    ------
    KeyboardInterrupt
        On Ctrl-C (during a search: once it stopped, :func:`run_search`); the records measured
        so far are in the database.
    FGQError
        The remote device has no server left, or a session on it fails; the records measured
        so far are in the database.
    """
    report = progress or (lambda line: None)
    database = open_database(folder, TUNE_REMEDY)
    finished = load_finished(folder, database.skipped)
    warning = skipped_warning(database)
    if warning:
        report(f"warning: {warning}")
    results = []
    for index, task in enumerate(tasks, start=1):
        searched = finished.get(workload_key(task), 0)
        result = _tune_task(task, target, trials, folder, database, searched, seed, threads, device)
        results.append(result)
        report(_progress_line(index, len(tasks), result))
    return _measure_cores_of(results, target, folder, report, threads, device)


def _measure_cores_of(
    results: list[TaskResult], target, folder: Path, report: Progress, threads: int,
    device: Device,
) -> list[TaskResult]:  # fmt: skip
    """``results`` with the cores of each task's layer timed (:func:`measure_cores`), once per
    layer, where several could compute it and this run searched the task or no measurement of
    the layer is on record; each measurement appended to the folder's core choices."""
    if all(len(_interchangeable(result.task.spec, target)) < 2 for result in results):
        return results  # no layer has cores to compare: no need to read the database again
    layers = {result.task.spec.layer.name: result.task.spec.layer for result in results}
    schedules = TunedSchedules(folder, target, layers)
    measured, timed = [], set()
    for result in results:
        key = _layer_key(result.task.spec)
        if key in timed or (result.skipped and key in schedules.core_choices):
            measured.append(result)
            continue
        timed.add(key)
        with thread_settings(threads):
            times = measure_cores(result.task, target, schedules, device)
        if times is not None:
            append_core_times(folder, times)
            report(f"cores of {result.task.name}: {times.summary()}")
        measured.append(replace(result, cores=times))
    return measured


def measure_cores(
    task: KernelTask, target, schedules: TunedSchedules, device: Device = LOCAL_DEVICE
) -> CoreTimes | None:
    """Time the task's layer on each core that could compute it in place of the task's
    (:func:`~fgq_tvm.schedules.select.interchangeable_cores`), in the same interleaved rounds
    on ``device``: each core's kernel as ``compile`` would build it (its verified tuned
    schedule from ``schedules`` where one beats its default, else its default), checked
    against the reference first (a kernel that fails is left out). ``None`` where fewer than
    two cores could, or pass the check."""
    spec = task.spec
    cores = _interchangeable(spec, target)
    if len(cores) < 2:
        return None
    with device.session() as session:
        calls, failed = {}, []
        for core in cores:
            candidate = KernelTask(replace(spec, core=core))
            func = schedules.kernel(candidate) or candidate.spec.kernels().layer
            if candidate.verify(func, target, session=session):
                calls[core] = candidate.runner(func, target, session)
            else:
                failed.append(core)
        if len(calls) < 2:
            return None
        times = time_rounds(
            calls, COMPARISON_ROUNDS, warmup=3, settle_s=0.0, timers=session.timers(calls)
        )
    medians = {core: median(values) for core, values in times.items()}
    return CoreTimes(_layer_key(spec), medians, device.name, failed)


def _interchangeable(spec: KernelSpec, target) -> list[str]:
    """The cores that could compute ``spec``'s layer on ``target``, its first core first
    (:func:`~fgq_tvm.schedules.select.interchangeable_cores`)."""
    return interchangeable_cores(spec.shape, spec.layer.act, layer_encoding(spec.layer), target)


def _layer_key(spec: KernelSpec) -> str:
    """:func:`~fgq_tvm.schedules.select.layer_key` of ``spec``'s layer."""
    return layer_key(spec.shape, spec.layer.act, layer_encoding(spec.layer))


def _tune_task(
    task: KernelTask, target, trials: int, folder: Path, database: TuningDatabase,
    searched: int, seed: int, threads: int, device: Device,
) -> TaskResult:  # fmt: skip
    """Search ``task`` for the trials neither its database records nor a finished search of
    ``searched`` trials cover, compare its best record with the default, note the search."""
    recorder = _VerifiedRecords(task, database, target, device)
    earlier = len(database.get_top_k(recorder.workload, trials)) if trials > 0 else 0
    if trials > 0 and max(searched, earlier) >= trials:
        best = _milliseconds(recorder.best_seconds)
        return TaskResult(task, 0, best, 0, earlier=earlier, skipped=True)
    device.check()  # a remote device with no server left stops the tune here
    with thread_settings(threads):
        if trials > 0:
            _search(task, target, trials - earlier, database, recorder, seed, device)
        record = database.query_tuning_record(task.workload(), target, "main")
        comparison = compare_with_default(task, record, target, device) if record else None
    if comparison is not None:
        append_comparison(folder, comparison)
    if trials > 0:
        _append_line(folder / FINISHED, vars(FinishedSearch(workload_key(task), trials)))
    best = _milliseconds(recorder.best_seconds)
    return TaskResult(task, recorder.measured, best, recorder.rejected, comparison, earlier=earlier)


def _milliseconds(seconds: float | None) -> float | None:
    return seconds * 1e3 if seconds else None


def _search(
    task: KernelTask, target, trials: int, database, recorder, seed: int, device: Device
) -> None:
    """MetaSchedule's evolutionary search over the task's schedule space, timed on ``device``."""
    from tvm.s_tir import meta_schedule as ms

    space = ms.space_generator.ScheduleFn(
        core_named(task.spec.core).schedule, sch_rules=[], postprocs=[], mutator_probs={}
    )
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=SEARCH_POPULATION, init_min_unmeasured=SEARCH_POPULATION
    )
    context = search_context(task.workload(), target, "main", space, strategy, seed)
    callbacks = [recorder, ms.measure_callback.UpdateCostModel()]
    run_search(context, trials, database, callbacks, device)


def search_context(workload: tvm.IRModule, target, name: str, space, strategy, seed: int):
    """A MetaSchedule task (``TuneContext``) of ``workload`` that logs to :data:`SEARCH_LOGGER`
    and searches with ``strategy`` (a search strategy or its name) without the schedules the
    database measured already (:class:`_UnmeasuredCandidates`).

    MetaSchedule's own ways to make one (``tune_tir``, ``tune_relax``,
    ``extracted_tasks_to_tune_contexts``) reconfigure the whole process's logging with
    ``logging.config.dictConfig``: that closes every handler in the process, and fails on a
    handler without a name on MetaSchedule's logger (pytest 9.2 adds one to each logger that
    does not propagate). A search must neither depend on nor change how the application that
    runs it configured logging, so it gets a plain logger: MetaSchedule's messages propagate to
    the application's handlers (warnings and above only, unless the application asks for more).
    """
    from tvm.s_tir import meta_schedule as ms

    if isinstance(strategy, str):
        strategy = ms.search_strategy.create(strategy)
    import_tensor_intrinsics()  # which TuneContext imports, slowly (tvmscript_parsing)
    return ms.TuneContext(
        mod=workload,
        target=target,
        space_generator=space,
        search_strategy=_UnmeasuredCandidates(strategy),
        task_name=name,
        rand_state=ms.utils.fork_seed(seed, n=1)[0],
        logger=logging.getLogger(SEARCH_LOGGER),
    ).clone()


def run_search(
    context, trials: int, database, measure_callbacks="default", device: Device = LOCAL_DEVICE
) -> None:
    """Measure up to ``trials`` candidates of the task ``context`` (:func:`search_context`),
    built here and timed on ``device``, committing them to ``database`` through
    ``measure_callbacks``; temporary files go to :func:`search_temporaries`.

    Raises
    ------
    KeyboardInterrupt
        On Ctrl-C, once the search stopped and its worker processes are gone
        (:func:`deferred_interrupts`).
    """
    from tvm.s_tir import meta_schedule as ms

    with (
        search_temporaries() as work_dir,
        _held_stderr(work_dir / "stderr"),
        deferred_interrupts(),
    ):
        runner = device.runner(BUILD_TIMEOUT_S)
        try:
            ms.tune.tune_tasks(
                tasks=[context],
                task_weights=[1.0],
                work_dir=str(work_dir),
                max_trials_global=trials,
                num_trials_per_iter=min(trials, 16),
                builder=ms.builder.LocalBuilder(
                    timeout_sec=BUILD_TIMEOUT_S, initializer=import_tensor_intrinsics
                ),  # each worker imports them before its first build: that way, in seconds
                runner=runner,
                database=database,
                cost_model="xgb",
                measure_callbacks=measure_callbacks,
            )
        finally:
            # now, in this thread: the garbage collector may run it in one of the pool's own
            # threads, which cannot join themselves ("Exception ignored ... cannot join")
            runner.pool.shutdown()


@contextlib.contextmanager
def search_temporaries() -> Iterator[Path]:
    """A folder for a search's temporary files, those of MetaSchedule's worker processes
    (started inside: ``TMPDIR``) included: ``<temp dir>/fgq-tune-<process id>``, removed on
    leaving; on entering, the folders of processes that no longer run (searches that were
    killed) are removed.

    Raises
    ------
    FGQError
        The folder cannot be created.
    """
    root = Path(tempfile.gettempdir())
    _remove_stale_temporaries(root)
    folder = root / f"{TEMPORARIES}{os.getpid()}"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise FGQError(f"cannot create {folder} ({error.strerror or error})") from None
    environment, previous = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        if environment is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = environment
        shutil.rmtree(folder, ignore_errors=True)


def _remove_stale_temporaries(root: Path) -> None:
    """Remove the :data:`TEMPORARIES` folders in ``root`` of processes that no longer run."""
    for folder in root.glob(f"{TEMPORARIES}*"):
        pid = folder.name.removeprefix(TEMPORARIES)
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


@contextlib.contextmanager
def _held_stderr(path: Path) -> Iterator[None]:
    """Within, what is written to file descriptor 2, by this process and by the worker
    processes started inside (they inherit it), goes to ``path``; it is copied to stderr on
    leaving, unless by ``KeyboardInterrupt``: Ctrl-C reaches the workers too, and those it
    meets while they import TVM print tracebacks."""
    sys.stderr.flush()
    saved = os.dup(2)
    interrupted = False
    with open(path, "w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not interrupted:
                held.seek(0)
                sys.stderr.write(held.read().decode(errors="replace"))
                sys.stderr.flush()


_INTERRUPTED = threading.Event()  # Ctrl-C within deferred_interrupts()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within (a search), Ctrl-C (SIGINT) notes the interrupt and kills the search's worker
    processes: the candidates in flight fail and the search stops
    (:class:`_UnmeasuredCandidates`); leaving the block then raises ``KeyboardInterrupt``,
    also in place of an error raised after the interrupt.

    ``KeyboardInterrupt`` raised wherever the signal lands is lost inside MetaSchedule's C++
    loop, or leaves its worker pools to be shut down at exit. Outside the main thread, which
    alone receives signals, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _INTERRUPTED.clear()
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    except Exception:
        if not _INTERRUPTED.is_set():
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupted = _INTERRUPTED.is_set()
        _INTERRUPTED.clear()
    if interrupted:
        gc.collect()  # worker pools an error left to the collector: shut down in this thread
        raise KeyboardInterrupt


def _interrupt(signum: int, frame) -> None:
    """Note Ctrl-C and kill the worker processes of the running search (a build inside LLVM
    would finish before it saw the signal: a minute on a busy machine)."""
    import psutil

    _INTERRUPTED.set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "tvm.exec.popen_worker" in child.cmdline():
                child.kill()


def _progress_line(index: int, total: int, result: TaskResult) -> str:
    best = f"best {result.best_ms:.3f} ms" if result.best_ms is not None else "no valid schedule"
    bar = progress_bar(index, total)
    if result.skipped:
        return f"{bar} {result.task.name}: had records ({result.earlier} measured), {best}"
    rejected = f", {result.rejected} wrong candidates rejected" if result.rejected else ""
    comparison = result.comparison
    if comparison is not None:
        verdict = "tuned kept" if comparison.tuned_wins else "default kept"
        rejected += (
            f"; same rounds: tuned {comparison.tuned_ms:.3f} ms, default "
            f"{comparison.default_ms:.3f} ms: {verdict}"
        )
    earlier = f" after {result.earlier} earlier" if result.earlier else ""
    return f"{bar} {result.task.name}: {result.trials} trials{earlier}, {best}{rejected}"


def measured_schedules(database, workload: tvm.IRModule) -> set[int]:
    """Structural hashes of the scheduled modules of ``workload``'s records in ``database``
    (records whose trace no longer applies are left out)."""
    if database is None or not database.has_workload(workload):
        return set()
    keys = set()
    for record in database.get_top_k(database.commit_workload(workload), len(database)):
        sch = tvm.s_tir.Schedule(workload)
        try:
            record.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception:  # a trace of another version of the space: no candidate equals it
            continue
        keys.add(tvm_ffi.structural_hash(sch.mod))
    return keys


def _measured_before():
    """A runner result that says a candidate was not run: the database measured it before."""
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.RunnerResult(run_secs=None, error_msg="measured before (in the database)")


@derived_object
class _UnmeasuredCandidates(PySearchStrategy):
    """The candidates of ``search`` (a MetaSchedule search strategy) that the database holds
    no record of; none once Ctrl-C was pressed (:func:`deferred_interrupts`).

    MetaSchedule's evolutionary search seeds its population with the database's best records
    and proposes them again: it only remembers the schedules it measured itself. Candidates
    left out do not count as trials, unless a whole batch was left out: the search is then told
    they failed, so that it moves on (else it would propose them forever).
    """

    def __init__(self, search) -> None:
        self.search = search
        self.workload: tvm.IRModule | None = None
        self.measured: set[int] = set()

    def _initialize_with_tune_context(self, context) -> None:
        self.workload = context.mod
        self.search._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database, cost_model):
        self.measured = measured_schedules(database, self.workload)
        self.search.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self) -> None:
        self.search.post_tuning()

    def generate_measure_candidates(self):
        while not _INTERRUPTED.is_set():
            candidates = self.search.generate_measure_candidates()
            if candidates is None:
                return None
            fresh = [
                c for c in candidates if tvm_ffi.structural_hash(c.sch.mod) not in self.measured
            ]
            if fresh:
                return fresh
            # all measured before: tell the search, which else proposes them forever
            failed = _measured_before()
            self.search.notify_runner_results(candidates, [failed] * len(candidates))
        return None

    def notify_runner_results(self, measure_candidates, results) -> None:
        self.search.notify_runner_results(measure_candidates, results)

    def clone(self):
        return _UnmeasuredCandidates(self.search.clone())


@derived_object
class _VerifiedRecords(PyMeasureCallback):
    """Commit measured candidates to the database; a would-be best only once it verifies on
    ``device``."""

    def __init__(self, task: KernelTask, database, target, device: Device) -> None:
        self.task = task
        self.database = database
        self.target = target
        self.device = device
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
                if not self.device.verify(self.task, self.task.apply(trace), self.target):
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
    :class:`~fgq_tvm.relax_passes.ApplyTunedSchedules`, and the core measured fastest for
    each layer it measured several on (:attr:`core_choices`: layer key to core name,
    :mod:`fgq_tvm.core_choices`).

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
        self.database = open_database(self.folder, COMPILE_REMEDY)
        self.comparisons = load_comparisons(self.folder, self.database.skipped)
        self.core_choices = load_core_choices(self.folder, self.database.skipped)
        self.unreadable = skipped_warning(self.database)  # about lines skipped, or None
        self.failed: list[str] = []
        self.slower: list[str] = []

    def __call__(self, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
        """The tuned, verified version of a kernel, or ``None``: another core, no record, a
        record slower than the default in its latest comparison (the task's name is added to
        :attr:`slower`), or one that fails the check (added to :attr:`failed`)."""
        task = kernel_task(func, self.layers)
        return None if task is None else self.kernel(task)

    def kernel(self, task: KernelTask) -> tvm.tirx.PrimFunc | None:
        """The tuned, verified kernel of ``task`` (see :meth:`__call__`)."""
        if not core_named(task.spec.core).tunable:
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
