"""Batch-1 latency of a compiled fgq-tvm module against its peers, measured in one run.

:func:`run_bench` compiles the model with :func:`~fgq_tvm.compiler.compile_model` (default
schedules), prepares every requested peer on the same model and calibration images, then times
them all on the same input with the same thread count, interleaved (:func:`time_rounds`):
``warmup`` untimed runs, then the median of ``repeats`` timed runs. The peers (:data:`PEERS`):

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

The "fgq-tvm tuned" row compiles with the target's tuning database (:func:`prepare_fgq_tuned`;
``n/a`` without one) and says how many kernels took a tuned schedule.

Each quantized layer's kernel is also timed on its own, as the compiled module has it (core,
fused epilogue, layouts, float or byte activations; default schedule), and its MAC rate
compared with the CPU's int8 VNNI peak (:func:`vnni_macs_per_cycle` per cycle per core). A
missing optional package (ONNX Runtime) turns its rows into "not installed"; a peer that fails
to build reads "failed" with the reason. Everything heavy is imported inside the functions that
need it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsageError
from .reporting import output_folder, write_text_atomically
from .target import TUNING_LOGS
from .threads import thread_settings

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .compiler import CompileResult
    from .config import QuantConfig
    from .models import ModelSpec
    from .relax_passes.legalize_quantized_layers import KernelSpec

Progress = Callable[[str], None]

PEERS = ("torch", "torch-int8", "ort", "ort-int8", "tvm-fp32")
"""Peers that ``--peers`` can select, in table order (fgq-tvm's own rows always come first)."""
FGQ = "fgq"
FGQ_TUNED = "fgq-tuned"
LABELS = {
    FGQ: "fgq-tvm (default schedules)",
    FGQ_TUNED: "fgq-tvm tuned",
    "torch": "PyTorch FP32 eager",
    "torch-int8": "PyTorch int8 (FX graph mode, x86, eager)",
    "ort": "ONNX Runtime FP32",
    "ort-int8": "ONNX Runtime int8 (static QDQ, per-channel)",
    "tvm-fp32": "TVM FP32 (MetaSchedule)",
}
SHORT_LABELS = {
    FGQ: "fgq-tvm",
    FGQ_TUNED: "fgq-tvm tuned",
    "torch": "PyTorch FP32",
    "torch-int8": "PyTorch int8",
    "ort": "ORT FP32",
    "ort-int8": "ORT int8",
    "tvm-fp32": "TVM FP32",
}
VNNI_MACS_PER_CYCLE = 64
"""int8 multiply-accumulates per cycle per core assumed for the peak: one 512-bit vpdpbusd (64
MACs) per cycle, as on Zen 4 (two 256-bit halves) and Intel client cores."""
TWO_FMA_UNIT_CPUS = frozenset({
    "skylake-avx512", "cascadelake", "cooperlake", "icelake-server", "sapphirerapids",
    "emeraldrapids", "graniterapids",
})  # fmt: skip
"""LLVM CPU names of Intel server cores that issue two 512-bit vpdpbusd per cycle (ports 0 and
5): 128 MACs per cycle per core."""
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3
DEFAULT_THREADS = 2
DEFAULT_CALIB_IMAGES = 32
SETTLE_S = 0.2  # pause between peers, so that one runtime's spinning threads go idle
MIN_KERNEL_REPEAT_MS = 10  # each timed kernel repeat loops the kernel for at least this long
ONNX_OPSET = 17
NOT_INSTALLED = "not installed"
NOT_AVAILABLE = "n/a"


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class PeerResult:
    """One row of the latency table.

    Attributes
    ----------
    key
        ``"fgq"``, ``"fgq-tuned"`` or one of :data:`PEERS`.
    label
        The runtime as the table names it.
    status
        ``"ok"``, ``"not installed"``, ``"n/a"`` or ``"failed"``.
    note
        How it was built, or why it has no time.
    times_ms
        Every timed run, in milliseconds (empty unless ``status == "ok"``).
    rel_error
        ``max |y - y_fp32| / max |y_fp32|`` of its logits against PyTorch FP32 on the timed
        input.
    """

    key: str
    label: str
    status: str
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    rel_error: float | None = None

    @property
    def median_ms(self) -> float | None:
        return median(self.times_ms) if self.times_ms else None

    @property
    def min_ms(self) -> float | None:
        return min(self.times_ms) if self.times_ms else None


@dataclass
class LayerResult:
    """One quantized layer's kernel, timed standalone."""

    name: str
    op: str
    weights: str
    core: str
    input_shape: tuple[int, ...]
    macs: int
    median_ms: float

    def gmacs_per_s(self) -> float:
        return self.macs / (self.median_ms * 1e6)


@dataclass
class BenchResult:
    """Everything one bench run measured (see :func:`to_json` for the file format)."""

    model: str
    target: str
    target_key: str
    quantization: dict
    threads: int
    repeats: int
    warmup: int
    calibration: str
    peers: list[PeerResult]
    layers: list[LayerResult]
    so_bytes: int
    fp32_param_bytes: int
    compile_s: float
    ghz: float | None
    ghz_source: str
    environment: dict
    macs_per_cycle: int = VNNI_MACS_PER_CYCLE

    def peer(self, key: str) -> PeerResult | None:
        return next((peer for peer in self.peers if peer.key == key), None)

    @property
    def peak_gmacs(self) -> float | None:
        if not self.ghz:
            return None
        return vnni_peak_gmacs(self.ghz, self.threads, self.macs_per_cycle)


# --------------------------------------------------------------------------------------------
# Small helpers: statistics, ratios, CPU facts
# --------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    """The median of ``values`` (the mean of the middle two for an even count).

    Raises
    ------
    ValueError
        If ``values`` is empty.
    """
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or ``reference`` is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def relative_error(output: np.ndarray, expected: np.ndarray) -> float:
    """``max |output - expected| / max |expected|`` (inf for a shape mismatch or NaN)."""
    output = np.asarray(output, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    if output.shape != expected.shape or not np.isfinite(output).all():
        return math.inf
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return float(np.max(np.abs(output - expected))) / max(scale, np.finfo(np.float32).tiny)


def cpu_ghz(cpuinfo: str) -> float | None:
    """The highest ``cpu MHz`` in ``/proc/cpuinfo`` text, in GHz (None when absent)."""
    values = []
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "cpu MHz":
            with contextlib.suppress(ValueError):
                values.append(float(value))
    return max(values) / 1000 if values else None


def cpu_name(cpuinfo: str) -> str:
    """The first ``model name`` in ``/proc/cpuinfo`` text, else the platform's processor."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return platform.processor() or "unknown CPU"


def read_cpuinfo(path: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The text of ``/proc/cpuinfo``, or ``""`` where there is none."""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def vnni_macs_per_cycle(target) -> int:
    """int8 MACs per cycle per core of the target's CPU (``-mcpu``): 128 for the Intel server
    cores of :data:`TWO_FMA_UNIT_CPUS`, else :data:`VNNI_MACS_PER_CYCLE`."""
    mcpu = str(target.attrs.get("mcpu", ""))
    return 2 * VNNI_MACS_PER_CYCLE if mcpu in TWO_FMA_UNIT_CPUS else VNNI_MACS_PER_CYCLE


def vnni_peak_gmacs(ghz: float, cores: int, macs_per_cycle: int = VNNI_MACS_PER_CYCLE) -> float:
    """int8 MAC peak in GMAC/s: ``macs_per_cycle`` x ``cores`` x ``ghz``."""
    return macs_per_cycle * cores * ghz


def fp32_parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters stored as float32: the sum of ``numel * 4``."""
    return sum(parameter.numel() * 4 for parameter in model.parameters())


def parse_peers(text: str) -> tuple[str, ...]:
    """Parse ``--peers``: a comma list of :data:`PEERS` (``all`` for every one, ``none``).

    Returns
    -------
    tuple of str
        The selected peers in :data:`PEERS` order, without duplicates.

    Raises
    ------
    UsageError
        An unknown name or an empty list.
    """
    names = [name.strip() for name in text.split(",")]
    if names == ["all"]:
        return PEERS
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in PEERS]
    if unknown or not text.strip():
        shown = ", ".join(repr(name) for name in unknown) if unknown else "(empty list)"
        raise UsageError(
            f"unknown peers {shown}: choose from {', '.join(PEERS)} (comma-separated), "
            "'all' or 'none'"
        )
    return tuple(peer for peer in PEERS if peer in names)


# --------------------------------------------------------------------------------------------
# Set-up shared by the peers, and timing
# --------------------------------------------------------------------------------------------


@dataclass
class BenchSetup:
    """What every peer is built from and run on.

    Attributes
    ----------
    model, spec
        The float model (eval mode) and its input spec.
    quant
        fgq-tvm's quantization configuration.
    calibration
        Normalised float32 NCHW calibration images, shared by every quantizing peer.
    target
        The :class:`tvm.target.Target` of fgq-tvm and of the TVM FP32 peer.
    x
        The timed input (float32, ``spec.input_shape``).
    workdir
        Folder for the ``.so`` and the ONNX files.
    threads
        Threads of every runtime.
    tuning_logs
        Where the tuning databases live (``<target key>`` for fgq-tvm's tuned row,
        ``<target key>/tvm-fp32`` for the TVM FP32 peer).
    """

    model: nn.Module
    spec: ModelSpec
    quant: QuantConfig
    calibration: torch.Tensor
    target: object
    x: np.ndarray
    workdir: Path
    threads: int
    tuning_logs: Path = TUNING_LOGS


@dataclass
class Runner:
    """A prepared runtime: ``run()`` computes the logits of the timed input as NumPy."""

    run: Callable[[], np.ndarray]
    note: str = ""


class PeerUnavailable(Exception):
    """A peer that cannot be measured here; ``status`` is "not installed" or "n/a"."""

    def __init__(self, status: str, note: str) -> None:
        super().__init__(note)
        self.status = status
        self.note = note


def time_rounds(
    runs: Mapping[str, Callable[[], object]], repeats: int, warmup: int, settle_s: float = SETTLE_S
) -> dict[str, list[float]]:
    """Wall times in milliseconds of ``repeats`` calls of each of ``runs``, interleaved.

    After ``warmup`` untimed calls of each, every one of ``repeats`` rounds gives each runtime
    in turn a pause of ``settle_s`` (the previous runtime's spinning threads go idle), one
    untimed call (caches warm again) and one timed call. A slow drift of the machine's speed
    (a neighbour on the host) then hits every runtime alike, and their ratios stay fair.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(settle_s)
            run()
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the peers' deprecation warnings and chatter on stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------
# The peers: one preparation function each
# --------------------------------------------------------------------------------------------


def prepare_fgq(
    setup: BenchSetup, tuning_logs: Path | None = None
) -> tuple[Runner, CompileResult, float]:
    """Compile the model with fgq-tvm and load the ``.so``: default schedules, or the tuned
    ones of ``tuning_logs`` where it has them.

    Returns
    -------
    runner, result, seconds
        The loaded module's runner, :func:`compile_model`'s result and the compile time.
    """
    from .compiler import compile_model
    from .runtime import load

    start = time.perf_counter()
    variant = "tuned" if tuning_logs is not None else "default"
    output = setup.workdir / f"{setup.spec.name}.{variant}.so"
    result = compile_model(
        setup.model, setup.spec, setup.quant, setup.calibration, setup.target, output,
        tuning_logs=tuning_logs,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    module = load(result.output)
    return Runner(lambda: module(setup.x), f"compiled in {seconds:.1f} s"), result, seconds


def prepare_fgq_tuned(setup: BenchSetup) -> Runner:
    """fgq-tvm with the tuned schedules of the target's database (verified at compile)."""
    from .target import database_folder

    folder = database_folder(setup.target, setup.tuning_logs)
    if not folder.is_dir():
        raise PeerUnavailable(NOT_AVAILABLE, f"no tuning database in {folder}")
    runner, result, _ = prepare_fgq(setup, setup.tuning_logs)
    layers = result.sidecar["layers"]
    tuned = sum(layer["schedule"] == "tuned" for layer in layers)
    note = f"{tuned} of {len(layers)} kernels tuned ({folder}); {runner.note}"
    return Runner(runner.run, note)


def prepare_torch(setup: BenchSetup) -> Runner:
    """PyTorch FP32 eager on the float model."""
    import torch

    x = torch.from_numpy(setup.x)

    def run() -> np.ndarray:
        with torch.no_grad():
            return setup.model(x).numpy()

    return Runner(run, f"torch {torch.__version__}")


def prepare_torch_int8(setup: BenchSetup) -> Runner:
    """PyTorch int8: FX graph mode post-training quantization (x86 backend), run eagerly."""
    import torch

    from .compiler import calibration_batches

    try:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    except ImportError as error:
        raise PeerUnavailable(
            NOT_AVAILABLE, f"torch.ao.quantization FX is gone in torch {torch.__version__}"
        ) from error
    torch.backends.quantized.engine = "x86"
    x = torch.from_numpy(setup.x)
    with _quiet(), torch.no_grad():
        model = copy.deepcopy(setup.model).eval()
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), example_inputs=(x,))
        for batch in calibration_batches(setup.calibration, setup.spec):
            prepared(batch)
        quantized = convert_fx(prepared)

    def run() -> np.ndarray:
        with torch.no_grad():
            return quantized(x).numpy()

    return Runner(run, "prepare_fx/convert_fx, get_default_qconfig_mapping('x86')")


def _onnxruntime():
    """The ``onnxruntime`` and ``onnx`` modules, or :class:`PeerUnavailable`."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
    except ImportError as error:
        raise PeerUnavailable(
            NOT_INSTALLED,
            f"{error.name or 'onnxruntime'} is not installed: pip install 'fgq-tvm[bench]'",
        ) from None
    return onnxruntime


def export_onnx(setup: BenchSetup) -> Path:
    """Export the float model to ONNX (TorchScript exporter) once; returns its path."""
    import torch

    path = setup.workdir / f"{setup.spec.name}.onnx"
    if not path.exists():
        with _quiet():
            torch.onnx.export(
                setup.model, (torch.from_numpy(setup.x),), str(path), dynamo=False,
                input_names=["input"], output_names=["logits"], opset_version=ONNX_OPSET,
            )  # fmt: skip
    return path


def _ort_runner(path: Path, setup: BenchSetup, note: str) -> Runner:
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = setup.threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return Runner(
        lambda: session.run(None, {name: setup.x})[0],
        f"onnxruntime {onnxruntime.__version__}, {note}",
    )


def prepare_ort(setup: BenchSetup) -> Runner:
    """ONNX Runtime FP32 on the exported model (default graph optimizations)."""
    _onnxruntime()
    return _ort_runner(export_onnx(setup), setup, f"opset {ONNX_OPSET}")


def calibration_reader(input_name: str, batches: list[torch.Tensor]):
    """An ONNX Runtime ``CalibrationDataReader`` that feeds ``batches`` once."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([{input_name: batch.numpy()} for batch in batches])

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    return Reader()


def prepare_ort_int8(setup: BenchSetup) -> Runner:
    """ONNX Runtime int8: static QDQ quantization, per-channel weights, MinMax calibration."""
    import torch

    _onnxruntime()
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = export_onnx(setup)
    pre = setup.workdir / f"{setup.spec.name}.pre.onnx"
    quantized = setup.workdir / f"{setup.spec.name}.int8.onnx"
    batch = setup.spec.input_shape[0]
    images = [image for image in torch.split(setup.calibration, batch) if len(image) == batch]
    with _quiet():
        quant_pre_process(str(source), str(pre))
        quantize_static(
            str(pre), str(quantized), calibration_reader("input", images),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
    return _ort_runner(quantized, setup, "quantize_static QDQ, u8 activations, s8 weights")


def prepare_tvm_fp32(setup: BenchSetup) -> Runner:
    """The float model (BatchNorm folded) through torch.export -> Relax -> TVM, with the
    MetaSchedule records of ``fgq-tvm tune --fp32`` where the target has them
    (:mod:`fgq_tvm.float_peer`)."""
    import tvm

    from .float_peer import build_float, float_folder, float_module, with_cores
    from .target import database_folder

    folder = float_folder(database_folder(setup.target, setup.tuning_logs))
    start = time.perf_counter()
    with _quiet():
        mod = float_module(setup.model, setup.spec.input_shape)
        built = build_float(mod, with_cores(setup.target, setup.threads), folder)
    seconds = time.perf_counter() - start
    machine = tvm.relax.VirtualMachine(built.executable, tvm.cpu())

    def run() -> np.ndarray:
        output = machine["main"](tvm.runtime.tensor(setup.x))
        return output[0].numpy() if not hasattr(output, "numpy") else output.numpy()

    schedules = (
        f"MetaSchedule records for {built.tuned} of {built.tasks} functions ({folder})"
        if built.database
        else f"untuned: no database in {folder} (fgq-tvm tune --fp32)"
    )
    return Runner(run, f"{schedules}; compiled in {seconds:.1f} s")


PREPARE: dict[str, Callable[[BenchSetup], Runner]] = {
    "torch": prepare_torch,
    "torch-int8": prepare_torch_int8,
    "ort": prepare_ort,
    "ort-int8": prepare_ort_int8,
    "tvm-fp32": prepare_tvm_fp32,
}


def prepared(key: str, prepare: Callable[[], Runner]) -> Runner | PeerResult:
    """``prepare()``, or the row that says why the peer cannot be timed."""
    try:
        return prepare()
    except PeerUnavailable as reason:
        return PeerResult(key, LABELS[key], reason.status, reason.note)
    except Exception as error:  # a peer's own toolchain fails in many ways; report, go on
        return PeerResult(key, LABELS[key], "failed", f"{type(error).__name__}: {_line(error)}")


def measure(
    runners: Mapping[str, Runner | PeerResult], expected: np.ndarray, repeats: int, warmup: int
) -> list[PeerResult]:
    """Compare each prepared runner's logits with ``expected``, then time them all in
    interleaved rounds (:func:`time_rounds`); a runner that fails is reported as failed."""
    errors: dict[str, float] = {}
    results: dict[str, PeerResult] = {}
    for key, runner in runners.items():
        if isinstance(runner, PeerResult):
            results[key] = runner
            continue
        try:
            errors[key] = relative_error(runner.run(), expected)
        except Exception as failure:  # see prepared()
            results[key] = _failed(key, failure)
    ready = {key: runners[key] for key in errors}
    try:
        times = time_rounds({key: runner.run for key, runner in ready.items()}, repeats, warmup)
    except Exception as failure:  # see prepared(); the runtimes ran once each above
        times, results = {}, results | {key: _failed(key, failure) for key in ready}
    for key, runner in ready.items():
        if key in times:
            results[key] = PeerResult(key, LABELS[key], "ok", runner.note, times[key], errors[key])
    return [results[key] for key in runners]


def _failed(key: str, failure: Exception) -> PeerResult:
    return PeerResult(key, LABELS[key], "failed", f"{type(failure).__name__}: {_line(failure)}")


# --------------------------------------------------------------------------------------------
# Per-layer kernels
# --------------------------------------------------------------------------------------------


def time_layer(spec: KernelSpec, target, repeats: int) -> LayerResult:
    """Build a layer's kernels as the compiled module has them (core, fused epilogue, layout;
    default schedule) and time the per-inference kernel standalone, its weights packed
    beforehand as at load time.

    The input is random, uniform over the layer's quantization range (the residual, if any,
    standard normal); the time is the median of ``repeats`` repeats of at least
    :data:`MIN_KERNEL_REPEAT_MS` each.
    """
    import tvm

    from .relax_passes.legalize_quantized_layers import kernel_arguments
    from .schedules.select import build_layer

    layer, shape = spec.layer, spec.shape
    built = build_layer(spec.kernels(), kernel_arguments(layer, spec.core), target)
    rng = np.random.default_rng(0)
    input_shape = (shape.batch, shape.in_channels, shape.height, shape.width)
    low, high = layer.act.qmin * layer.act.scale, layer.act.qmax * layer.act.scale
    x = rng.uniform(low, high, input_shape).astype(np.float32)
    x = layer.act.stored(x) if spec.quantized_input else x
    out_dims = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
    residual = [rng.normal(size=out_dims).astype(np.float32)] if spec.epilogue.residual else []
    timer = built.module.time_evaluator(
        "main", tvm.cpu(), number=1, repeat=repeats, min_repeat_ms=MIN_KERNEL_REPEAT_MS
    )
    seconds = median(list(timer(*built.arguments(x, *residual)).results))
    weights = f"ternary N={layer.group_size}" if layer.is_ternary else layer.config.weights
    return LayerResult(
        layer.name, layer.op, weights, spec.core, input_shape, shape.macs, seconds * 1e3
    )


def time_layers(
    compiled: CompileResult, target, repeats: int, progress: Progress
) -> list[LayerResult]:
    """:func:`time_layer` for every quantized layer of a compiled model, in model order."""
    results = []
    for index, (name, spec) in enumerate(compiled.kernels.items(), 1):
        progress(f"time kernel {index}/{len(compiled.kernels)}: {name}")
        results.append(time_layer(spec, target, repeats))
    return results


# --------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchOptions:
    """How to bench: peers, timing, threads, the clock of the peak, the tuning databases."""

    peers: tuple[str, ...] = PEERS
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    threads: int = DEFAULT_THREADS
    ghz: float | None = None
    tuning_logs: Path = TUNING_LOGS


def describe_calibration(spec: ModelSpec, path: str | os.PathLike | None, count: int) -> str:
    """Where the calibration images came from (as :func:`~fgq_tvm.data.load_calibration` picks
    them for ``path``), for the table."""
    from .data import CIFAR10_NPZ, data_dir

    if path is not None:
        return f"{count} images of {path}"
    cifar = data_dir() / CIFAR10_NPZ
    if tuple(spec.input_shape[1:]) == (3, 32, 32) and cifar.is_file():
        return f"{count} images of the CIFAR-10 calibration split"
    return f"{count} random normal images (fixed seed)"


def timed_input(spec: ModelSpec) -> np.ndarray:
    """The input every runtime is timed on: standard normal, fixed seed."""
    return np.random.default_rng(0).standard_normal(spec.input_shape).astype(np.float32)


def run_bench(
    model: nn.Module,
    spec: ModelSpec,
    quant: QuantConfig,
    calibration: torch.Tensor,
    target,
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

    from .target import target_key

    options = options or BenchOptions()
    report = progress or (lambda stage: None)
    x = timed_input(spec)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory() as folder, thread_settings(options.threads):
        setup = BenchSetup(
            model, spec, quant, calibration, target, x, Path(folder), options.threads,
            options.tuning_logs,
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
        layers = time_layers(compiled, target, options.repeats, report)
        so_bytes = compiled.output.stat().st_size
        environment = describe_environment(load_start)
    ghz, ghz_source = _clock(options.ghz)
    return BenchResult(
        model=spec.name,
        target=target_text(target),
        target_key=target_key(target),
        quantization=compiled.sidecar["quantization"],
        threads=options.threads,
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
    )


def _clock(override: float | None) -> tuple[float | None, str]:
    if override is not None:
        return override, "--ghz"
    ghz = cpu_ghz(read_cpuinfo())
    return ghz, "max 'cpu MHz' of /proc/cpuinfo" if ghz else "unknown (pass --ghz)"


def describe_environment(load_at_start: float | None) -> dict:
    """CPU, versions, thread counts, load average and date of the run."""
    import torch
    import tvm

    from . import __version__

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


# --------------------------------------------------------------------------------------------
# Tables and files
# --------------------------------------------------------------------------------------------


def to_json(result: BenchResult) -> dict:
    """The JSON form of a result: its fields plus medians, ratios, MAC rates and the peak."""
    data = asdict(result)
    torch_fp32, torch_int8 = (_median_of(result, key) for key in ("torch", "torch-int8"))
    for row, peer in zip(data["peers"], result.peers, strict=True):
        row["median_ms"] = peer.median_ms
        row["min_ms"] = peer.min_ms
        row["ratio_to_torch_fp32"] = ratio(peer.median_ms, torch_fp32)
        row["ratio_to_torch_int8"] = ratio(peer.median_ms, torch_int8)
    peak = result.peak_gmacs
    for row, layer in zip(data["layers"], result.layers, strict=True):
        row["gmacs_per_s"] = layer.gmacs_per_s()
        row["fraction_of_peak"] = ratio(layer.gmacs_per_s(), peak)
    data["peak_gmacs_per_s"] = peak
    data["size_ratio"] = ratio(result.so_bytes, result.fp32_param_bytes)
    return data


def _median_of(result: BenchResult, key: str) -> float | None:
    peer = result.peer(key)
    return peer.median_ms if peer else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}{suffix}"


PEER_COLUMNS = (
    "runtime", "median ms", "min ms", "x PyTorch FP32", "x PyTorch int8",
    "rel. error vs FP32", "note",
)  # fmt: skip
LAYER_COLUMNS = (
    "layer",
    "op",
    "weights",
    "core",
    "input",
    "MMACs",
    "median ms",
    "GMAC/s",
    "% of peak",
)


def peer_rows(result: BenchResult) -> list[list[str]]:
    """Rows of the latency table (:data:`PEER_COLUMNS`)."""
    torch_fp32, torch_int8 = (_median_of(result, key) for key in ("torch", "torch-int8"))
    rows = []
    for peer in result.peers:
        if peer.status != "ok":
            rows.append([peer.label, peer.status, "", "", "", "", peer.note])
            continue
        rows.append([
            peer.label, _number(peer.median_ms), _number(peer.min_ms),
            _number(ratio(peer.median_ms, torch_fp32), suffix="x"),
            _number(ratio(peer.median_ms, torch_int8), suffix="x"),
            f"{peer.rel_error:.1e}" if peer.rel_error is not None else "", peer.note,
        ])  # fmt: skip
    return rows


def layer_rows(result: BenchResult) -> list[list[str]]:
    """Rows of the per-layer table (:data:`LAYER_COLUMNS`), then a total row."""
    peak = result.peak_gmacs
    rows = []
    for layer in result.layers:
        rate = layer.gmacs_per_s()
        rows.append([
            layer.name, layer.op, layer.weights, layer.core, "x".join(map(str, layer.input_shape)),
            _number(layer.macs / 1e6, 1), _number(layer.median_ms, 3), _number(rate, 1),
            _number(100 * ratio(rate, peak), 1) if peak else "",
        ])  # fmt: skip
    macs = sum(layer.macs for layer in result.layers)
    seconds = sum(layer.median_ms for layer in result.layers)
    rate = macs / (seconds * 1e6) if seconds else None
    share = _number(100 * rate / peak, 1) if peak and rate else ""
    rows.append(["**all layers**", "", "", "", "", _number(macs / 1e6, 1), _number(seconds, 3),
                 _number(rate, 1), share])  # fmt: skip
    return rows


def format_markdown(result: BenchResult) -> str:
    """The markdown report: set-up, latency table, size, per-layer kernel table."""
    quant = result.quantization
    env = result.environment
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    loads = ", ".join(_number(value) for value in env["load_average_1min"])
    peak = result.peak_gmacs
    peak_text = (
        f"{result.macs_per_cycle} MACs/cycle/core x {result.threads} cores x "
        f"{result.ghz:.2f} GHz ({result.ghz_source}) = {peak:.0f} GMAC/s"
        if peak
        else "unknown: the clock is unknown, pass --ghz"
    )
    fgq = result.peer(FGQ)
    fgq_rate = ratio(
        sum(layer.macs for layer in result.layers) / 1e6, fgq.median_ms if fgq else None
    )
    lines = [
        f"# {result.model}: fgq-tvm against its peers",
        "",
        f"Batch 1, {result.threads} threads per runtime, target `{result.target}`, "
        f"{env['cpu']} ({env['cpu_count']} CPUs). fgq-tvm: N={quant['group_size']}, "
        f"{quant['act_bits']}-bit activations, {quant['scales']} group scales, "
        f"first/last layer {quant['first_last']}. "
        f"Calibration: {result.calibration}. Median of {result.repeats} runs after "
        f"{result.warmup} warm-up runs, on the same input, interleaved: in each round every "
        "runtime makes one untimed and one timed run after a pause; "
        f"{env['date']}; load average {loads} (start, end); {versions}.",
        "",
        "`x PyTorch FP32` and `x PyTorch int8` are latency ratios (above 1: slower). The "
        "relative error is max|y - y_fp32| / max|y_fp32| of the logits on the timed input (the "
        "weights may be random: this is no accuracy measurement).",
        "",
        markdown_table(PEER_COLUMNS, peer_rows(result)),
        "",
        f"Size: the fgq-tvm `.so` is {result.so_bytes / 1e6:.2f} MB against "
        f"{result.fp32_param_bytes / 1e6:.2f} MB of FP32 parameters "
        f"({_number(ratio(result.so_bytes, result.fp32_param_bytes))}x); compiled in "
        f"{result.compile_s:.1f} s.",
        "",
        "## Quantized layers, each kernel timed standalone",
        "",
        f"int8 VNNI peak: {peak_text}. Whole model through fgq-tvm: {_number(fgq_rate, 1)} GMAC/s.",
        "",
        markdown_table(LAYER_COLUMNS, layer_rows(result)),
    ]
    return "\n".join(lines) + "\n"


def target_text(target) -> str:
    """A target as users write it: ``llvm -mcpu=znver4 -mattr=+avx2``."""
    words = [str(target.kind.name)]
    for key in ("mtriple", "mcpu", "mabi"):
        value = target.attrs.get(key)
        if value:
            words.append(f"-{key}={value}")
    features = target.attrs.get("mattr")
    if features:
        words.append("-mattr=" + ",".join(str(feature) for feature in features))
    return " ".join(words)


def default_out_dir(target) -> Path:
    """``benchmarks/results/<target key>`` (relative to the working directory)."""
    from .target import target_key

    return Path("benchmarks") / "results" / target_key(target)


def write_results(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<model>.md`` and ``.json``; returns both paths.

    Raises
    ------
    FGQError
        ``out_dir`` exists and is not a folder, or cannot be created.
    """
    output_folder(out_dir)
    markdown, data = out_dir / f"{result.model}.md", out_dir / f"{result.model}.json"
    write_text_atomically(markdown, format_markdown(result))
    write_text_atomically(data, json.dumps(to_json(result), indent=2) + "\n")
    return markdown, data


def _line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""


def summary_markdown(results: Sequence[dict]) -> str:
    """One table of the median latencies of several models, from their JSON results.

    Parameters
    ----------
    results
        Dicts written by :func:`write_results` (:func:`to_json`), one per model.

    Returns
    -------
    str
        A markdown table: one row per model, one column per runtime (ms), ``n/a`` or the
        status where a runtime has no time, and a footnote per distinct set-up.
    """
    keys = [FGQ, FGQ_TUNED, *PEERS]
    header = ["model", *(f"{SHORT_LABELS[key]} ms" for key in keys), "fgq-tvm / PyTorch FP32"]
    rows = []
    for data in sorted(results, key=lambda data: data["model"]):
        peers = {peer["key"]: peer for peer in data["peers"]}
        cells = [_summary_cell(peers.get(key)) for key in keys]
        fgq_ratio = peers.get(FGQ, {}).get("ratio_to_torch_fp32")
        rows.append([data["model"], *cells, _number(fgq_ratio, suffix="x")])
    setups = sorted(
        {
            f"target `{data['target']}`, {data['threads']} threads, median of "
            f"{data['repeats']} runs, {data['environment']['cpu']}"
            for data in results
        }
    )
    notes = "\n".join(f"- {setup}" for setup in setups)
    return f"{markdown_table(header, rows)}\n\nBatch 1; measured with:\n{notes}\n"


def _summary_cell(peer: dict | None) -> str:
    if peer is None:
        return "not measured"
    if peer["status"] != "ok":
        return peer["status"]
    return _number(peer["median_ms"])
