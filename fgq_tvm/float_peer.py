"""The full-precision TVM peer: the float model through Relax, tuned by MetaSchedule's own rules.

``bench``'s ``tvm-fp32`` row answers "what does plain TVM make of this model on this machine?".

Module
    The float model with BatchNorm folded into its convolutions (as fgq-tvm folds it), through
    torch.export and Relax with the weights bound as constants, then TVM's fusion
    (:func:`fusion_passes`: LegalizeOps, FuseOps, FuseTIR: convolution, bias, residual add and
    ReLU in one function), the preparation ``compile_relax`` applies before it reads a database.
Tasks
    One per distinct fused function (:func:`float_tasks`).
Space and search
    MetaSchedule's default space for the target (multi-level tiling, parallel, vectorise,
    unroll) and evolutionary search with the XGBoost cost model, ``trials`` candidates per
    task: the budget ``fgq-tvm tune`` gives each of fgq-tvm's kernels.
Records
    A MetaSchedule JSON database in ``tuning_logs/<target key>/tvm-fp32`` (:func:`float_folder`),
    appended. A task with records counts as tuned: tuning again resumes with the others.
Build
    :func:`build_float`: ``compile_relax`` with that database where it exists (functions without
    a record keep TVM's default lowering), else ``tvm.compile``.
Verification
    The peer computes in float, so no record is checked bit for bit: ``bench`` compares its
    logits with PyTorch FP32 on the timed input and prints the relative error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import tvm
from torch import nn

from .quant.batchnorm import fold_batchnorm
from .reporting import progress_bar
from .threads import thread_settings
from .tuning import TUNE_REMEDY, open_database, run_search, search_context

FLOAT_DATABASE = "tvm-fp32"
Progress = Callable[[str], None]


def float_module(model: nn.Module, input_shape: tuple[int, ...]) -> tvm.IRModule:
    """The float model, BatchNorm folded, as a Relax module with its weights bound."""
    from tvm.relax.frontend.torch import from_exported_program

    folded = fold_batchnorm(copy.deepcopy(model).eval())
    exported = torch.export.export(folded, (torch.zeros(input_shape),))
    return from_exported_program(exported)


def fusion_passes(target) -> list[tvm.transform.Pass]:
    """What ``compile_relax`` runs before it looks functions up in a database."""
    from tvm import relax

    return [
        *relax.pipeline.library_dispatch_passes(target),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def float_tasks(mod: tvm.IRModule, target) -> list:
    """MetaSchedule's tasks of ``mod`` (from :func:`float_module`): one per distinct fused
    function, as ``ExtractedTask``."""
    from tvm.s_tir import meta_schedule as ms

    with target:
        fused = tvm.transform.Sequential(fusion_passes(target))(mod)
    return ms.relax_integration.extract_tasks(fused, target)


def with_cores(target, cores: int):
    """``target`` with ``num-cores`` set, which MetaSchedule's default space requires."""
    return tvm.target.Target({**target.export(), "num-cores": cores})


def float_folder(database_folder: Path) -> Path:
    """The peer's database beside fgq-tvm's (``database_folder``: the target's folder)."""
    return Path(database_folder) / FLOAT_DATABASE


@dataclass(frozen=True)
class FloatTaskResult:
    """A task after tuning: its name, the valid candidates this run recorded (0: it had
    records already) and its best recorded time in milliseconds (``None``: no valid
    candidate)."""

    name: str
    trials: int
    best_ms: float | None


def tune_float(
    mod: tvm.IRModule,
    target,
    trials: int,
    folder: Path,
    progress: Progress | None = None,
    seed: int = 0,
    threads: int = 2,
) -> list[FloatTaskResult]:
    """Tune every task of ``mod`` without records for ``trials`` candidates, appending the
    records to the database in ``folder`` (:func:`float_folder`).

    Parameters
    ----------
    mod
        From :func:`float_module`.
    target
        The :class:`tvm.target.Target` to tune for (this machine must run its code).
    trials
        Measured candidates per task.
    folder
        The database folder.
    progress
        Called with one line per task.
    seed
        Seed of the search.
    threads
        Threads the candidates run with (those the module will run with).
    """
    report = progress or (lambda line: None)
    database = open_database(folder, TUNE_REMEDY)
    target = with_cores(target, threads)
    tasks = float_tasks(mod, target)
    results = []
    for index, task in enumerate(tasks, start=1):
        workload = task.dispatched[0]
        measured = 0
        if not _records(database, workload, 1):
            with thread_settings(threads):
                _search(task, target, trials, database, seed)
            measured = len(_records(database, workload, trials))
        result = FloatTaskResult(task.task_name, measured, _best_ms(database, workload))
        results.append(result)
        report(_progress_line(index, len(tasks), result))
    return results


def _records(database, workload: tvm.IRModule, limit: int) -> list:
    """The ``limit`` fastest valid records of ``workload`` (none if it was never tuned)."""
    if not database.has_workload(workload):
        return []
    return list(database.get_top_k(database.commit_workload(workload), limit))


def _best_ms(database, workload: tvm.IRModule) -> float | None:
    top = _records(database, workload, 1)
    return 1e3 * sum(float(t) for t in top[0].run_secs) / len(top[0].run_secs) if top else None


def _search(task, target, trials: int, database, seed: int) -> None:
    """MetaSchedule's default space and evolutionary search over one fused function."""
    context = search_context(
        task.dispatched[0], target, task.task_name, "post-order-apply", "evolutionary", seed
    )
    run_search(context, trials, database)


def _progress_line(index: int, total: int, result: FloatTaskResult) -> str:
    best = f"best {result.best_ms:.3f} ms" if result.best_ms is not None else "no valid schedule"
    done = f"{result.trials} candidates" if result.trials else "had records"
    return f"{progress_bar(index, total)} {result.name}: {done}, {best}"


@dataclass(frozen=True)
class FloatBuild:
    """The peer's executable and how it was built."""

    executable: object
    tuned: int  # tasks with a record in the database
    tasks: int
    database: Path | None


def build_float(mod: tvm.IRModule, target, folder: Path | None) -> FloatBuild:
    """``mod`` compiled with the records of ``folder`` where it holds a database, else by
    ``tvm.compile`` with TVM's default lowering."""
    from tvm.s_tir import meta_schedule as ms

    if folder is None or not Path(folder).is_dir():
        with target:
            return FloatBuild(tvm.compile(mod, target=target), 0, 0, None)
    database = open_database(folder, "fix or move it, or bench with another --tuning-logs DIR")
    tasks = float_tasks(mod, target)
    tuned = sum(bool(_records(database, task.dispatched[0], 1)) for task in tasks)
    executable = ms.relax_integration.compile_relax(database, mod, target, params=None)
    return FloatBuild(executable, tuned, len(tasks), Path(folder))
