"""The runtimes ``fgq-tvm bench`` times fgq-tvm against, and how they are prepared and timed.

Each peer has a preparation function (:data:`PREPARE`; fgq-tvm's own rows :func:`prepare_fgq`
and :func:`prepare_fgq_tuned`) that builds it from a :class:`BenchSetup` and returns a
:class:`Runner`, or raises :class:`PeerUnavailable`; :func:`prepared` turns a failure into the
row that says why, and :func:`measure` checks every runner's logits and times them all in
interleaved rounds (:func:`~fgq_tvm.timing.time_rounds`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from ..remote import LOCAL, Session
from ..target import TUNING_LOGS, database_folder
from ..timing import Timer, time_rounds
from .results import LABELS, NOT_AVAILABLE, NOT_INSTALLED, PEERS, PeerResult

if TYPE_CHECKING:
    import torch
    from onnxruntime.quantization import CalibrationDataReader
    from torch import nn

    from ..compiler import CompileResult
    from ..config import QuantConfig
    from ..models import ModelSpec
    from ..quant.quantize import QuantizedModel

ONNX_OPSET = 17


def relative_error(output: np.ndarray, expected: np.ndarray) -> float:
    """``max |output - expected| / max |expected|``.

    Parameters
    ----------
    output, expected
        Logits of a runtime and of the reference (any shapes: they are flattened).

    Returns
    -------
    float
        inf where the sizes differ or ``output`` is not finite.
    """
    output = np.asarray(output, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    if output.shape != expected.shape or not np.isfinite(output).all():
        return math.inf
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return float(np.max(np.abs(output - expected))) / max(scale, np.finfo(np.float32).tiny)


def parse_peers(text: str) -> tuple[str, ...]:
    """Parse ``--peers``: a comma list of :data:`PEERS` (``all`` for every one, ``none``).

    Parameters
    ----------
    text
        The option's value, such as ``"torch,ort-int8"``.

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
    session
        Where fgq-tvm's modules run (:mod:`fgq_tvm.remote`); the peers run here.
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
    session: Session = LOCAL


@dataclass
class Runner:
    """A prepared runtime: ``run()`` computes the logits of the timed input as NumPy;
    ``timer`` times it where the wall clock here cannot (on a remote device)."""

    run: Callable[[], np.ndarray]
    note: str = ""
    timer: Timer | None = None


class PeerUnavailable(Exception):
    """A peer that cannot be measured here; ``status`` is "not installed" or "n/a"."""

    def __init__(self, status: str, note: str) -> None:
        super().__init__(note)
        self.status = status
        self.note = note


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the peers' deprecation warnings and chatter on stdout."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def prepare_fgq(
    setup: BenchSetup, tuning_logs: Path | None = None, quantized: QuantizedModel | None = None
) -> tuple[Runner, CompileResult, float]:
    """Compile the model with fgq-tvm and load the ``.so`` on ``setup.session``: default
    schedules, or the tuned ones of ``tuning_logs`` where it has them.

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.
    tuning_logs
        Where the tuning databases live; None: default schedules.
    quantized
        The model as an earlier compile quantized it (only compiled again, for the input
        shape of ``setup.spec``), or None to quantize it.

    Returns
    -------
    runner, result, seconds
        The loaded module's runner, :func:`~fgq_tvm.compiler.compile_model`'s result and the
        compile time.
    """
    from ..compiler import compile_model, compile_quantized

    start = time.perf_counter()
    variant = "tuned" if tuning_logs is not None else "default"
    output = setup.workdir / f"{setup.spec.name}.{variant}.so"
    if quantized is None:
        result = compile_model(
            setup.model, setup.spec, setup.quant, setup.calibration, setup.target, output,
            tuning_logs=tuning_logs,
        )  # fmt: skip
    else:
        result = compile_quantized(quantized, setup.spec, setup.target, output, None, tuning_logs)
    seconds = time.perf_counter() - start
    model = setup.session.load_model(result.output, setup.x)
    return Runner(model.run, f"compiled in {seconds:.1f} s", model.timer), result, seconds


def prepare_fgq_tuned(setup: BenchSetup, quantized: QuantizedModel | None = None) -> Runner:
    """fgq-tvm with the tuned schedules of the target's database (verified at compile).

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.
    quantized
        As for :func:`prepare_fgq`.

    Returns
    -------
    Runner

    Raises
    ------
    PeerUnavailable
        ``n/a``: the target has no tuning database under ``setup.tuning_logs``.
    """
    folder = database_folder(setup.target, setup.tuning_logs)
    if not folder.is_dir():
        raise PeerUnavailable(NOT_AVAILABLE, f"no tuning database in {folder}")
    runner, result, _ = prepare_fgq(setup, setup.tuning_logs, quantized)
    layers = result.sidecar["layers"]
    tuned = sum(layer["schedule"] == "tuned" for layer in layers)
    note = f"{tuned} of {len(layers)} kernels tuned ({folder}); {runner.note}"
    return Runner(runner.run, note, runner.timer)


def prepare_torch(setup: BenchSetup) -> Runner:
    """PyTorch FP32 eager on the float model.

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.

    Returns
    -------
    Runner
    """
    import torch

    x = torch.from_numpy(setup.x)

    def run() -> np.ndarray:
        with torch.no_grad():
            return setup.model(x).numpy()

    return Runner(run, f"torch {torch.__version__}")


def prepare_torch_int8(setup: BenchSetup) -> Runner:
    """PyTorch int8: FX graph mode post-training quantization (x86 backend), run eagerly.

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.

    Returns
    -------
    Runner

    Raises
    ------
    PeerUnavailable
        ``n/a``: this PyTorch has no ``torch.ao.quantization`` FX graph mode.
    """
    import torch

    from ..compiler import calibration_batches

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
    """Export the float model to ONNX (TorchScript exporter), once per set-up.

    Parameters
    ----------
    setup
        The model, its timed input and the folder of the file.

    Returns
    -------
    Path
        ``<workdir>/<model>.onnx``.
    """
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
    """ONNX Runtime FP32 on the exported model (default graph optimizations).

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.

    Returns
    -------
    Runner

    Raises
    ------
    PeerUnavailable
        ``not installed``: ONNX Runtime or ONNX is missing.
    """
    _onnxruntime()
    return _ort_runner(export_onnx(setup), setup, f"opset {ONNX_OPSET}")


def calibration_reader(input_name: str, batches: list[torch.Tensor]) -> CalibrationDataReader:
    """An ONNX Runtime ``CalibrationDataReader`` that feeds ``batches`` once.

    Parameters
    ----------
    input_name
        The model's input.
    batches
        The calibration batches, each of the model's input shape.

    Returns
    -------
    onnxruntime.quantization.CalibrationDataReader
    """
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter([{input_name: batch.numpy()} for batch in batches])

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    return Reader()


def prepare_ort_int8(setup: BenchSetup) -> Runner:
    """ONNX Runtime int8: static QDQ quantization, per-channel weights, MinMax calibration.

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.

    Returns
    -------
    Runner

    Raises
    ------
    PeerUnavailable
        ``not installed``: ONNX Runtime or ONNX is missing.
    """
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
    (:mod:`fgq_tvm.float_peer`).

    Parameters
    ----------
    setup
        The model, its calibration images, the timed input, the target and the threads.

    Returns
    -------
    Runner
    """
    import tvm

    from ..float_peer import build_float, float_folder, float_module, with_cores

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
    """``prepare()``, or the row that says why the peer cannot be timed.

    Parameters
    ----------
    key
        The runtime: ``"fgq-tuned"`` or one of :data:`PEERS`.
    prepare
        Its preparation (see :data:`PREPARE`).

    Returns
    -------
    Runner or PeerResult
        The runner, or a row whose status is that of :class:`PeerUnavailable`, or ``failed``
        with the first line of any other exception.
    """
    try:
        return prepare()
    except PeerUnavailable as reason:
        return PeerResult(key, LABELS[key], reason.status, reason.note)
    except Exception as error:  # a peer's own toolchain fails in many ways; report, go on
        return _failed(key, error)


def measure(
    runners: Mapping[str, Runner | PeerResult], expected: np.ndarray, repeats: int, warmup: int
) -> list[PeerResult]:
    """Compare each prepared runner's logits with ``expected``, then time them all in
    interleaved rounds (:func:`~fgq_tvm.timing.time_rounds`, by their own timers where they
    have one); a runner that fails is reported as failed.

    Parameters
    ----------
    runners
        The runtimes by key, each prepared or the row that says why it is not
        (:func:`prepared`).
    expected
        The reference logits (PyTorch FP32) of the timed input.
    repeats, warmup
        Timed and untimed runs of each.

    Returns
    -------
    list of PeerResult
        One row per runtime, in the order of ``runners``.
    """
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
    runs = {key: runner.run for key, runner in ready.items()}
    timers = {key: runner.timer for key, runner in ready.items() if runner.timer}
    try:
        times = time_rounds(runs, repeats, warmup, timers=timers)
    except Exception as failure:  # see prepared(); the runtimes ran once each above
        times, results = {}, results | {key: _failed(key, failure) for key in ready}
    for key, runner in ready.items():
        if key in times:
            results[key] = PeerResult(key, LABELS[key], "ok", runner.note, times[key], errors[key])
    return [results[key] for key in runners]


def _failed(key: str, failure: Exception) -> PeerResult:
    return PeerResult(key, LABELS[key], "failed", f"{type(failure).__name__}: {_line(failure)}")


def _line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else ""
