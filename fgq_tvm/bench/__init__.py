"""Batch-1 latency of a compiled fgq-tvm module against its peers, measured in one run.

:func:`run_bench` compiles the model with :func:`~fgq_tvm.compiler.compile_model` (default
schedules), prepares every requested peer on the same model and calibration images, then times
them all on the same input with the same thread count, interleaved
(:func:`~fgq_tvm.timing.time_rounds`): ``warmup`` untimed runs, then the median of ``repeats``
timed runs. The peers (:data:`PEERS`):

* ``torch``: PyTorch FP32 eager;
* ``torch-int8``: PyTorch int8, ``torch.ao.quantization`` FX graph mode (``prepare_fx`` /
  ``convert_fx`` with the ``"x86"`` qconfig mapping), calibrated on the calibration images and
  run eagerly;
* ``ort`` and ``ort-int8``: ONNX Runtime FP32, and int8 by static QDQ quantization
  (``quantize_static``, per-channel weights, calibrated on the same images);
* ``tvm-fp32``: the float model, BatchNorm folded, through the same Relax import and TVM's
  own fusion and lowering, with the MetaSchedule records of ``fgq-tvm tune --fp32`` (default
  rules, the trial budget of fgq-tvm's kernels) where the target has them
  (:mod:`~fgq_tvm.float_peer`).

The "fgq-tvm tuned" row compiles with the target's tuning database
(:func:`~fgq_tvm.bench.peers.prepare_fgq_tuned`; ``n/a`` without one) and says how many kernels
took a tuned schedule.

On a remote device (:class:`~fgq_tvm.remote.RemoteDevice`, ``--rpc-tracker``) fgq-tvm's rows
and kernels are built here and run on one of its servers, timed by the server's clock
(:mod:`fgq_tvm.remote`), in one session held for the whole run; the peers run on this machine
only, so none may be asked for. The threads are those the server runs, the clock of the peak
is ``--ghz`` alone.

Each quantized layer's kernel is also timed on its own, as the compiled module has it (core,
fused epilogue, layouts, float or byte activations; default schedule), and its MAC rate compared
with the CPU's int8 VNNI peak (:func:`~fgq_tvm.cpu_features.vnni_macs_per_cycle` per cycle per
core) and, on a CPU with AMX, with the AMX int8 peak that fgq-tvm's microbenchmark measures in
the same run (:mod:`~fgq_tvm.bench.amx_peak`). A missing optional package (ONNX Runtime) turns
its rows into "not installed"; a peer that fails to build reads "failed" with the reason.
Everything heavy is imported inside the functions that need it.

The package, by concern: :mod:`~fgq_tvm.bench.results` (the rows, the run, its JSON),
:mod:`~fgq_tvm.bench.peers` (preparing and timing the runtimes), :mod:`~fgq_tvm.bench.layers`
(the per-layer kernels), :mod:`~fgq_tvm.bench.amx_peak` (the AMX microbenchmark),
:mod:`~fgq_tvm.bench.tables` (Markdown and files), and here the whole run (:func:`run_bench`,
:class:`BenchOptions`) and its set-up. The names the command line and the benchmark scripts use
are re-exported here.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..cpu_features import cpu_ghz, cpu_name, read_cpuinfo, vnni_macs_per_cycle
from ..errors import UsageError
from ..remote import LOCAL_DEVICE, Device, RemoteDevice
from ..target import TUNING_LOGS, target_key
from ..threads import thread_settings
from .layers import Progress, time_layers
from .peers import (
    PREPARE,
    BenchSetup,
    Runner,
    measure,
    parse_peers,
    prepare_fgq,
    prepare_fgq_tuned,
    prepare_torch,
    prepared,
)
from .results import (
    FGQ,
    FGQ_TUNED,
    LABELS,
    NOT_AVAILABLE,
    PEERS,
    BenchResult,
    LayerResult,
    PeerResult,
    to_json,
)
from .tables import default_out_dir, format_markdown, summary_markdown, target_text, write_results

if TYPE_CHECKING:
    import torch
    from torch import nn
    from tvm.target import Target

    from ..config import QuantConfig
    from ..models import ModelSpec
    from ..quant.quantize import QuantizedModel

__all__ = [
    "DEFAULT_CALIB_IMAGES",
    "DEFAULT_REPEATS",
    "DEFAULT_THREADS",
    "DEFAULT_WARMUP",
    "LABELS",
    "PEERS",
    "BenchOptions",
    "BenchResult",
    "LayerResult",
    "PeerResult",
    "bench_model",
    "default_out_dir",
    "describe_calibration",
    "describe_environment",
    "format_markdown",
    "fp32_parameter_bytes",
    "parse_batches",
    "parse_peers",
    "run_bench",
    "summary_markdown",
    "timed_input",
    "to_json",
    "write_results",
]

DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3
DEFAULT_THREADS = 2
DEFAULT_CALIB_IMAGES = 32
MAX_BATCH = 256


@dataclass(frozen=True)
class BenchOptions:
    """How to bench: peers, timing, threads, the clock of the peak, the tuning databases.

    Attributes
    ----------
    peers
        The peers to time besides fgq-tvm, from :data:`PEERS` (:func:`parse_peers` reads
        ``--peers``).
    repeats
        Timed runs of each runtime (at least 1).
    warmup
        Untimed runs of each first (at least 0).
    threads
        Threads of every runtime (at least 1).
    ghz
        The clock of the int8 peak, in GHz; None: the highest ``cpu MHz`` of
        ``/proc/cpuinfo``.
    tuning_logs
        Where the tuning databases live (``<target key>`` under it).
    batches
        Larger batches to time every runtime at as well (throughput; each in rounds of its
        own), at most :data:`MAX_BATCH` images.
    device
        Where fgq-tvm runs: this machine, or a :class:`~fgq_tvm.remote.RemoteDevice` (then
        without peers, and ``threads`` is the servers' own count).

    Raises
    ------
    UsageError
        A peer not in :data:`PEERS`, a count or clock out of its range, or peers on a remote
        device.
    """

    peers: tuple[str, ...] = PEERS
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    threads: int = DEFAULT_THREADS
    ghz: float | None = None
    tuning_logs: Path = TUNING_LOGS
    batches: tuple[int, ...] = ()
    device: Device = LOCAL_DEVICE

    def __post_init__(self) -> None:
        unknown = [peer for peer in self.peers if peer not in PEERS]
        if unknown:
            shown = ", ".join(map(repr, unknown))
            raise UsageError(f"unknown peers {shown}: choose from {', '.join(PEERS)}")
        if self.peers and isinstance(self.device, RemoteDevice):
            raise UsageError(
                "the peers (PyTorch, ONNX Runtime, TVM FP32) run on this machine only: with "
                "--rpc-tracker, bench times fgq-tvm alone; drop --peers or give --peers none"
            )
        for name, least in (("repeats", 1), ("warmup", 0), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"{name} must be an integer of at least {least}, got {value!r}")
        if self.ghz is not None and not 0 < self.ghz < math.inf:
            raise UsageError(f"the clock must be a positive number of GHz, got {self.ghz!r}")
        for batch in self.batches:
            if isinstance(batch, bool) or not isinstance(batch, int) or not 1 < batch <= MAX_BATCH:
                raise UsageError(
                    f"batch {batch!r} cannot be timed: give batches of 2 to {MAX_BATCH} images"
                )


def parse_batches(text: str) -> tuple[int, ...]:
    """Parse ``--batches``: a comma list of batch sizes (2..:data:`MAX_BATCH`) or ``none``.

    Raises
    ------
    UsageError
        A word is not such a batch size.
    """
    if text.strip() == "none":
        return ()
    words = [word.strip() for word in text.split(",")]
    batches = tuple(int(word) if word.isdigit() else word for word in words)
    BenchOptions(batches=batches)  # its checks, in one place
    return tuple(dict.fromkeys(batches))


def bench_model(
    model: nn.Module,
    spec: ModelSpec,
    quant: QuantConfig,
    target: Target,
    options: BenchOptions,
    out_dir: Path,
    calib: str | os.PathLike | None = None,
    calib_images: int = DEFAULT_CALIB_IMAGES,
    progress: Progress | None = None,
    warn: Progress | None = None,
) -> tuple[BenchResult, tuple[Path, Path]]:
    """What ``fgq-tvm bench`` does: load the calibration images, :func:`run_bench`, write the
    report into ``out_dir`` (:func:`write_results`).

    Parameters
    ----------
    model, spec, quant, target, options
        As for :func:`run_bench`.
    out_dir
        Where ``<model>.md`` and ``.json`` go.
    calib, calib_images
        The calibration images (``None``: those ``fgq-tvm compile`` picks by default) and the
        most of them to use (:func:`~fgq_tvm.data.load_calibration`).
    progress, warn
        Called with each stage, and with a warning about the calibration images.

    Returns
    -------
    tuple of (BenchResult, (Path, Path))
        The result and the paths of the Markdown and JSON reports.
    """
    from ..data import load_calibration

    calibration, warning = load_calibration(calib, spec, "calib", calib_images)
    if warning and warn is not None:
        warn(warning)
    note = describe_calibration(spec, calib, len(calibration))
    result = run_bench(model, spec, quant, calibration, target, options, note, progress)
    return result, write_results(result, out_dir)


def describe_calibration(spec: ModelSpec, path: str | os.PathLike | None, count: int) -> str:
    """Where the calibration images came from (as :func:`~fgq_tvm.data.load_calibration` picks
    them for ``path``), for the table.

    Parameters
    ----------
    spec
        The model's input spec.
    path
        The ``--calib`` file, or None for the default images.
    count
        How many images were loaded.

    Returns
    -------
    str
        Such as ``"32 images of the CIFAR-10 calibration split"``.
    """
    from ..data import has_real_calibration

    if path is not None:
        return f"{count} images of {path}"
    if has_real_calibration(path, spec):
        return f"{count} images of the CIFAR-10 calibration split"
    return f"{count} random normal images (fixed seed)"


def timed_input(spec: ModelSpec) -> np.ndarray:
    """The input every runtime is timed on: standard normal, fixed seed.

    Parameters
    ----------
    spec
        The model's input spec (its ``input_shape``).

    Returns
    -------
    numpy.ndarray
        float32, of ``spec.input_shape``.
    """
    return np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)


def run_bench(
    model: nn.Module,
    spec: ModelSpec,
    quant: QuantConfig,
    calibration: torch.Tensor,
    target: Target,
    options: BenchOptions | None = None,
    calibration_note: str = "",
    progress: Progress | None = None,
) -> BenchResult:
    """Compile ``model`` with fgq-tvm, prepare the peers, time everything back to back.

    Parameters
    ----------
    model, spec
        The float model (eval mode) and its input spec.
    quant
        fgq-tvm's quantization configuration.
    calibration
        Normalised float32 NCHW images: fgq-tvm's calibration and the int8 peers'.
    target
        A :class:`tvm.target.Target` (see :func:`fgq_tvm.target.parse_target`).
    options
        Peers, repeats, warm-up runs, threads and clock (defaults: :class:`BenchOptions`).
    calibration_note
        Where the calibration images came from, for the table.
    progress
        Called with a short description of each stage.

    Returns
    -------
    BenchResult
    """
    import tempfile

    from .amx_peak import measure_amx_peak  # TVMScript: imported where it is needed

    options = options or BenchOptions()
    report = progress or (lambda stage: None)
    x = timed_input(spec)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    remote = isinstance(options.device, RemoteDevice)
    with (
        tempfile.TemporaryDirectory() as folder,
        thread_settings(options.threads),
        options.device.session(timeout_s=0) as session,  # held while compiling between timings
    ):
        setup = BenchSetup(
            model, spec, quant, calibration, target, x, Path(folder), options.threads,
            options.tuning_logs, session,
        )  # fmt: skip
        report("compile with fgq-tvm")
        fgq_runner, compiled, compile_s = prepare_fgq(setup)
        runners: dict[str, Runner | PeerResult] = {FGQ: fgq_runner}
        tuned = prepared(FGQ_TUNED, lambda: prepare_fgq_tuned(setup))
        runners[FGQ_TUNED] = tuned
        for key in options.peers:
            report(f"prepare {LABELS[key]}")
            runners[key] = prepared(key, lambda key=key: PREPARE[key](setup))
        expected = prepare_torch(setup).run()
        report(f"time {len(runners)} runtimes in {options.repeats} interleaved rounds")
        peers = measure(runners, expected, options.repeats, options.warmup)
        batches = {
            batch: _time_batch(setup, compiled.quantized, batch, options, report)
            for batch in options.batches
        }
        layers = time_layers(compiled, target, options.repeats, report, session)
        report("measure the AMX int8 peak")
        amx_peak = (
            (None, "not measured on a remote device")
            if remote
            else measure_amx_peak(target, options.threads, options.repeats)
        )
        so_bytes = compiled.output.stat().st_size
        environment = describe_environment(load_start)
        threads = session.threads() if remote else options.threads
    if remote:
        environment["device"] = options.device.name
    ghz, ghz_source = _clock(options.ghz, local=not remote)
    return BenchResult(
        model=spec.name,
        target=target_text(target),
        target_key=target_key(target),
        quantization=compiled.sidecar["quantization"],
        threads=threads,
        repeats=options.repeats,
        warmup=options.warmup,
        calibration=calibration_note or f"{len(calibration)} images",
        peers=peers,
        layers=layers,
        so_bytes=so_bytes,
        fp32_param_bytes=fp32_parameter_bytes(model),
        compile_s=compile_s,
        ghz=ghz,
        ghz_source=ghz_source,
        environment=environment,
        macs_per_cycle=vnni_macs_per_cycle(target),
        batches=batches,
        amx_peak_gmacs=amx_peak[0],
        amx_peak_source=amx_peak[1],
    )


def _time_batch(
    setup: BenchSetup,
    quantized: QuantizedModel,
    batch: int,
    options: BenchOptions,
    report: Progress,
) -> list[PeerResult]:
    """Every runtime of the run prepared again for ``batch`` images per run (fgq-tvm compiles
    the model it quantized once more for that input shape) and timed in interleaved rounds of
    their own (fgq-tvm's on ``setup.session``)."""
    if setup.spec.fixed_batch:
        return [
            PeerResult(key, LABELS[key], NOT_AVAILABLE, f"{setup.spec.name} runs at one batch")
            for key in (FGQ, FGQ_TUNED, *options.peers)
        ]
    spec = replace(setup.spec, input_shape=(batch, *setup.spec.input_shape[1:]))
    x = np.random.default_rng(batch).standard_normal(spec.input_shape).astype(np.float32)
    workdir = setup.workdir / f"batch{batch}"
    workdir.mkdir()
    setup = replace(setup, spec=spec, x=x, workdir=workdir)
    report(f"compile with fgq-tvm for batch {batch}")
    runners: dict[str, Runner | PeerResult] = {
        FGQ: prepared(FGQ, lambda: prepare_fgq(setup, quantized=quantized)[0]),
        FGQ_TUNED: prepared(FGQ_TUNED, lambda: prepare_fgq_tuned(setup, quantized)),
    }
    for key in options.peers:
        report(f"prepare {LABELS[key]} for batch {batch}")
        runners[key] = prepared(key, lambda key=key: PREPARE[key](setup))
    report(f"time {len(runners)} runtimes at batch {batch} in {options.repeats} rounds")
    return measure(runners, prepare_torch(setup).run(), options.repeats, options.warmup)


def _clock(override: float | None, local: bool = True) -> tuple[float | None, str]:
    """The clock of the peak and its source: ``override``, else this machine's where the
    kernels ran here."""
    if override is not None:
        return override, "--ghz"
    if not local:
        return None, "unknown on a remote device (pass --ghz)"
    ghz = cpu_ghz(read_cpuinfo())
    return ghz, "max 'cpu MHz' of /proc/cpuinfo" if ghz else "unknown (pass --ghz)"


def describe_environment(load_at_start: float | None) -> dict:
    """CPU, versions, thread counts, load average and date of the run.

    Parameters
    ----------
    load_at_start
        The 1-minute load average when the run began (None where unknown).

    Returns
    -------
    dict
        ``cpu``, ``cpu_count``, ``torch_threads``, ``tvm_threads``, ``load_average_1min``
        (start, end), ``versions`` and ``date``.
    """
    import torch
    import tvm

    from .. import __version__

    versions = {"fgq_tvm": __version__, "torch": torch.__version__, "tvm": tvm.__version__}
    with contextlib.suppress(ImportError):
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    load_at_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_name(read_cpuinfo()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "tvm_threads": int(tvm.runtime.num_threads()),
        "load_average_1min": [load_at_start, load_at_end],
        "versions": versions,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fp32_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters stored as float32: the sum of ``numel * 4``.

    Parameters
    ----------
    model
        The float model.

    Returns
    -------
    int
    """
    return sum(parameter.numel() * 4 for parameter in model.parameters())
