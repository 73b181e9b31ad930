"""The compile pipeline: PyTorch model -> quantized reference -> Relax -> native ``.so``.

Data flows one way (DESIGN.md): quantize (calibrate, ternarize, fold BatchNorm) ->
torch.export -> Relax (ConvertLayout to NCHW16c on the int8 dot cores, NHWC on the GPU) ->
:class:`~fgq_tvm.relax_passes.LegalizeQuantizedLayers` ->
:class:`~fgq_tvm.relax_passes.FuseLayerEpilogues` (residual adds and ReLUs into the kernels) ->
:class:`~fgq_tvm.relax_passes.BlockKernelOutputs` (the stem writes NCHW16c) ->
:class:`~fgq_tvm.relax_passes.QuantizeKernelOutputs` (activation bytes between kernels) ->
:class:`~fgq_tvm.relax_passes.ApplyTunedSchedules` (when the target has a tuning database) ->
:class:`~fgq_tvm.relax_passes.PromoteAveragesToFloat64` -> bind the remaining float
parameters -> :class:`~fgq_tvm.relax_passes.LiftConstantComputations` (weight packing moves to
the module's ``prepare`` function, run at load time) -> LegalizeOps ->
:class:`~fgq_tvm.relax_passes.ScheduleGraphOperators` -> ``tvm.compile`` -> ``export_library``.
The ``.so`` is written under a temporary name and renamed, and a sidecar JSON beside it records
what a user of the module needs to know (see :func:`sidecar_path`) and the module's SHA-256.
Writers of one output take turns under a lock file beside it, ``.<output name>.lock`` (see
:func:`_locked_output`).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import tvm
from torch import nn

from . import __version__
from .config import QuantConfig
from .cuda_binary import compiling_cuda_with_nvcc
from .errors import FGQError
from .models import ModelSpec
from .quant.layers import QuantizedLayer
from .quant.quantize import QuantizedModel, quantize_model
from .relax_passes import (
    ApplyTunedSchedules,
    BlockKernelOutputs,
    FuseLayerEpilogues,
    LegalizeQuantizedLayers,
    LiftConstantComputations,
    PromoteAveragesToFloat64,
    QuantizeKernelOutputs,
    ScheduleGraphOperators,
)
from .reporting import output_file
from .runtime import SIDECAR_FORMAT, module_digest, sidecar_path
from .schedules.conv2d_cuda import is_cuda
from .schedules.cuda_pipeline import cuda_tir_pipeline
from .schedules.gpu_rules import schedule_for_gpu
from .schedules.kernel_spec import KernelSpec, layer_encoding
from .schedules.layout import NCHW
from .schedules.select import network_layout

Progress = Callable[[str], None]
CALIB_BATCH_SIZE = 32
# LLVM's debug info is a third of a small module and helps no user of generated kernels
LINK_OPTIONS = ["-Wl,--strip-debug"]


@dataclass
class CompileResult:
    """What :func:`compile_model` produced: the module's path, its sidecar, the quantized
    model and each layer's kernel as compiled (default schedule)."""

    output: Path
    sidecar: dict
    quantized: QuantizedModel
    kernels: dict[str, KernelSpec]


def compile_model(
    model: nn.Module,
    spec: ModelSpec,
    quant: QuantConfig,
    calibration: torch.Tensor,
    target,
    output: str | os.PathLike,
    progress: Progress | None = None,
    calib_batch_size: int = CALIB_BATCH_SIZE,
    tuning_logs: Path | None = None,
    cuda_graph: bool = False,
) -> CompileResult:
    """Quantize ``model`` and compile it for ``target`` into the shared library ``output``.

    Parameters
    ----------
    model
        The float PyTorch model (eval mode).
    spec
        Its input shape (batch included) and normalisation.
    quant
        The quantization configuration.
    calibration
        float32 NCHW calibration images, already normalised.
    target
        A :class:`tvm.target.Target` (see :func:`fgq_tvm.target.parse_target`).
    output
        Path of the ``.so`` to write; its sidecar JSON goes beside it.
    progress
        Called with a short description of each stage.
    calib_batch_size
        Images per calibration batch (models with a fixed batch use theirs).
    tuning_logs
        Folder of tuning databases: the kernels recorded in ``tuning_logs/<target key>`` (if
        it exists) use their tuned schedules, verified first (:mod:`fgq_tvm.tuning`); ``None``:
        default schedules only.
    cuda_graph
        On a ``cuda`` target, run the kernels that neither read the input nor write the
        logits as one CUDA graph, captured at the first inference and replayed after
        (TVM's ``RewriteCUDAGraph``).

    Returns
    -------
    CompileResult

    Raises
    ------
    FGQError
        ``cuda_graph`` for a target that is not ``cuda``, or any stage fails.
    """
    if cuda_graph and not is_cuda(target):
        raise FGQError(f"CUDA graphs need a cuda target, not {target.kind.name}")
    output_file(Path(output))  # before the minutes of quantization
    quantized = quantize(model, spec, quant, calibration, progress, calib_batch_size)
    return compile_quantized(quantized, spec, target, output, progress, tuning_logs, cuda_graph)


def compile_quantized(
    quantized: QuantizedModel,
    spec: ModelSpec,
    target,
    output: str | os.PathLike,
    progress: Progress | None = None,
    tuning_logs: Path | None = None,
    cuda_graph: bool = False,
) -> CompileResult:
    """The second stage of :func:`compile_model`: lower, build and write ``quantized``."""
    report = progress or (lambda stage: None)
    output = output_file(Path(output))
    tuned = _tuned_schedules(tuning_logs, target, quantized.layers)
    report("export to Relax" + (f", tuned schedules from {tuned.folder}" if tuned else ""))
    mod = lower_to_relax(quantized, spec.input_shape, target, tuned)
    if tuned is not None and tuned.unreadable:
        report(f"warning: {tuned.unreadable}")
    if tuned is not None and tuned.failed:
        report(f"tuned schedules failed the check, defaults kept: {', '.join(tuned.failed)}")
    if tuned is not None and tuned.slower:
        report(f"tuned schedules slower than the defaults, defaults kept: {len(tuned.slower)}")
    report(f"build for {target}" + (", the kernels as one CUDA graph" if cuda_graph else ""))
    executable = _build(mod, target, cuda_graph)
    kernels = kernel_info(mod, quantized.layers)
    sidecar = describe(quantized, spec, target, kernels, tuned.folder if tuned else None)
    sidecar = _write_outputs(output, executable, sidecar)
    specs = {name: kernel.spec for name, kernel in kernels.items()}
    return CompileResult(output, sidecar, quantized, specs)


def quantize(
    model: nn.Module,
    spec: ModelSpec,
    quant: QuantConfig,
    calibration: torch.Tensor,
    progress: Progress | None = None,
    calib_batch_size: int = CALIB_BATCH_SIZE,
) -> QuantizedModel:
    """The first stage of :func:`compile_model` (and of tuning): ``model`` quantized with
    ``quant``, calibrated on ``calibration`` in batches of :func:`calibration_batches`."""
    report = progress or (lambda stage: None)
    batches = calibration_batches(calibration, spec, calib_batch_size)
    return quantize_model(model, quant, batches, progress=lambda s: report(f"quantize: {s}"))


def calibration_batches(
    calibration: torch.Tensor, spec: ModelSpec, batch_size: int = CALIB_BATCH_SIZE
) -> list[torch.Tensor]:
    """Split the calibration images into model inputs (whole batches for fixed-batch models)."""
    if not spec.fixed_batch:
        return list(torch.split(calibration, batch_size))
    fixed = spec.input_shape[0]
    batches = [batch for batch in torch.split(calibration, fixed) if batch.shape[0] == fixed]
    if not batches:
        raise FGQError(f"{spec.name} runs at batch {fixed} only: give at least {fixed} images")
    return batches


def _tuned_schedules(tuning_logs: Path | None, target, layers):
    """The target's tuned schedules, or ``None`` without a database."""
    from .target import database_folder
    from .tuning import TunedSchedules

    folder = database_folder(target, tuning_logs) if tuning_logs is not None else None
    if folder is None or not folder.is_dir():
        return None
    return TunedSchedules(folder, target, layers)


def lower_to_relax(
    quantized: QuantizedModel, input_shape: tuple[int, ...], target=None, tuned=None
):
    """The Relax module of the quantized network: ``prepare()`` packs the constant weights,
    ``main(x, prepare())`` runs the network.

    On a target with a core that computes in another layout than NCHW
    (:func:`~fgq_tvm.schedules.select.network_layout`: NCHW16c on the x86 integer dot cores,
    NHWC on the GPU), activations between conv layers stay in it from the first layer in it
    to the last; Relax's ConvertLayout places the transforms at the edges.

    ``target`` picks each layer's core (``None``: the portable bitplane core everywhere);
    ``tuned`` (a :class:`~fgq_tvm.tuning.TunedSchedules`) supplies tuned kernels, and the
    fastest core measured for a layer where several can compute it
    (:mod:`fgq_tvm.core_choices`).
    """
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    exported = _export(quantized, input_shape)
    by_parameter = _layers_by_parameter(exported, quantized.layers)
    mod = from_exported_program(exported, keep_params_as_input=True)
    mod = relax.transform.CanonicalizeBindings()(mod)  # max_pool2d's unused indices go
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    layout = network_layout(target)
    if layout != NCHW:
        mod = relax.transform.ConvertLayout({"relax.nn.conv2d": [layout, "OIHW"]})(mod)
        mod = relax.transform.EliminateCommonSubexpr()(mod)
    choices = tuned.core_choices if tuned is not None else None
    mod = LegalizeQuantizedLayers(by_parameter, target, choices)(mod)
    mod = FuseLayerEpilogues(quantized.layers)(mod)
    mod = BlockKernelOutputs(quantized.layers)(mod)
    mod = QuantizeKernelOutputs(quantized.layers)(mod)
    if tuned is not None:
        mod = ApplyTunedSchedules(tuned)(mod)
    mod = PromoteAveragesToFloat64()(mod)
    mod, params = relax.frontend.detach_params(mod)
    names = [var.name for var in mod["main"].params[1:]]
    mod = relax.transform.BindParams("main", dict(zip(names, params["main"], strict=True)))(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    mod = relax.transform.LegalizeOps()(LiftConstantComputations()(mod))
    return schedule_for_gpu(mod, target) if is_cuda(target) else ScheduleGraphOperators()(mod)


def _export(quantized: QuantizedModel, input_shape: tuple[int, ...]):
    """torch.export of the folded float model without the quantized layers' biases.

    The quantized kernels add the bias themselves (in the order the reference does).
    """
    model = copy.deepcopy(quantized.folded_model).eval()
    for name in quantized.layers:
        model.get_submodule(name).register_parameter("bias", None)
    example = torch.zeros(input_shape, dtype=torch.float32)
    try:
        return torch.export.export(model, (example,))
    except Exception as error:  # torch.export raises many unrelated types
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise FGQError(
            f"torch.export could not trace the model ({type(error).__name__}: {first_line})"
        ) from None


def _layers_by_parameter(exported, layers: dict[str, QuantizedLayer]) -> dict:
    """``placeholder name -> QuantizedLayer`` for the quantized layers' weights."""
    result = {}
    for placeholder, target in exported.graph_signature.inputs_to_parameters.items():
        module, _, attribute = target.rpartition(".")
        if attribute == "weight" and module in layers:
            result[placeholder] = layers[module]
    missing = set(layers) - {layer.name for layer in result.values()}
    if missing:
        raise FGQError(f"layers {sorted(missing)} were not found in the exported graph")
    return result


def _build(mod, target, cuda_graph: bool = False):
    """``tvm.compile``; its CPU pipeline folds no constants, so ``prepare`` stays a function.
    GPU code is compiled by nvcc into the module (:mod:`fgq_tvm.cuda_binary`), its kernels
    captured as a CUDA graph with ``cuda_graph``."""
    if not is_cuda(target):
        with target:
            return tvm.compile(mod, target=target)
    graphs = tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": cuda_graph})
    with target, graphs, compiling_cuda_with_nvcc(str(target.attrs["arch"])):
        return tvm.compile(
            mod,
            target=target,
            relax_pipeline=_gpu_lowering(target),
            tir_pipeline=cuda_tir_pipeline(),
        )


def _gpu_lowering(target) -> tvm.transform.Pass:
    """TVM's CUDA pipeline without its graph-level steps: it would fold the weight packing of
    ``prepare`` into the module (FoldConstant), fuse operators into the kernels and schedule
    the fused functions anew (FuseOps, FuseTIR, DLight); every PrimFunc is scheduled already."""
    from tvm.relax.backend.cuda import pipeline

    return tvm.transform.Sequential(
        [*pipeline.dataflow_lower_passes(target), *pipeline.finalize_passes(target)]
    )


def _write_outputs(output: Path, executable, sidecar: dict) -> dict:
    """Write the module and its sidecar under temporary names, then rename both into place.

    Nothing half-written is ever visible: if building either file fails, both temporaries are
    removed. The sidecar written (and returned) is ``sidecar`` with the SHA-256 of the module,
    which :func:`fgq_tvm.runtime.load` checks. Writers of one output take turns
    (:func:`_locked_output`), so concurrent compiles leave one compile's pair.
    """
    staged: list[Path] = []
    with _locked_output(output):
        try:
            module = _stage(output, staged, mode=0o755)
            executable.export_library(str(module), options=LINK_OPTIONS)
            sidecar = {**sidecar, "module_sha256": module_digest(module)}
            description = _stage(sidecar_path(output), staged, mode=0o644)
            description.write_text(_json(sidecar))
            os.replace(description, sidecar_path(output))
            os.replace(module, output)
        finally:
            for path in staged:
                path.unlink(missing_ok=True)
    return sidecar


@contextlib.contextmanager
def _locked_output(output: Path) -> Iterator[None]:
    """Hold the lock of ``output`` (``flock`` of ``.<name>.lock`` beside it) and remove the
    temporaries a writer killed before it could clean up left of ``output`` (all of them are
    stale: every live writer holds the lock while its temporaries exist).

    The lock file stays: removing it could let two writers hold locks on different files.
    """
    lock = _lock_path(output)
    try:
        descriptor = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as error:
        raise FGQError(f"cannot open the lock file {lock} ({error.strerror or error})") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        _remove_temporaries(output)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _remove_temporaries(output: Path) -> None:
    """Remove the files :func:`_stage` names for ``output`` and its sidecar (``mkstemp``'s
    names: eight random characters between a prefix and a suffix)."""
    names = [
        re.compile(re.escape(f".{path.name}.") + "[a-z0-9_]{8}" + re.escape(path.suffix))
        for path in (output, sidecar_path(output))
    ]
    for path in output.parent.iterdir():
        stale = any(name.fullmatch(path.name) for name in names) and path != _lock_path(output)
        if stale and not path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()


def _stage(path: Path, staged: list[Path], mode: int) -> Path:
    """A fresh temporary file beside ``path`` with the usual permissions (``mode`` & ~umask)."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    staged.append(Path(name))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, mode & ~umask)
    return Path(name)


@dataclass(frozen=True)
class CompiledKernel:
    """A layer's kernel in the lowered module: what it computes and where its schedule came
    from (``"default"`` or ``"tuned"``)."""

    spec: KernelSpec
    schedule: str

    def summary(self) -> dict[str, str]:
        """Its entries in the layer's sidecar row."""
        spec = self.spec
        return {
            "core": spec.core,
            "epilogue": spec.epilogue.name,
            "layout": spec.layouts.name,
            "input": spec.input_dtype,
            "schedule": self.schedule,
        }


def kernel_info(mod, layers: Mapping[str, QuantizedLayer]) -> dict[str, CompiledKernel]:
    """``layer -> CompiledKernel`` as the passes recorded them on the kernels' attributes."""
    info = {}
    for _, func in mod.functions_items():
        spec = KernelSpec.of(func, layers) if isinstance(func, tvm.tirx.PrimFunc) else None
        if spec is not None:
            schedule = str(func.attrs.get("fgq.schedule", "default"))
            info[spec.layer.name] = CompiledKernel(spec, schedule)
    return info


def describe(
    quantized: QuantizedModel,
    spec: ModelSpec,
    target,
    kernels: Mapping[str, CompiledKernel],
    tuning_database: Path | None = None,
) -> dict:
    """The sidecar JSON: input contract, quantization and kernel per layer, versions."""

    config = quantized.config
    return {
        "format": SIDECAR_FORMAT,
        "model": spec.name,
        "fgq_tvm_version": __version__,
        "tvm_version": tvm.__version__,
        "target": str(target),
        "tuning_database": str(tuning_database) if tuning_database else None,
        "input": {
            "shape": list(spec.input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "normalisation": {"mean": list(spec.mean), "std": list(spec.std)},
        },
        "output": {"shape": [spec.input_shape[0], spec.num_classes], "dtype": "float32"},
        "quantization": config.summary(),
        "layers": [
            layer_summary(layer, kernels[name].summary())
            for name, layer in quantized.layers.items()
        ],
        "float_layers": [
            {"name": name, "reason": reason} for name, reason in quantized.float_layers.items()
        ],
    }


def layer_summary(layer: QuantizedLayer, kernel: dict[str, str]) -> dict:
    """One layer's row of the sidecar and of the compile summary (``kernel``: its kernel's
    :meth:`CompiledKernel.summary`)."""
    return {
        "name": layer.name,
        "op": layer.op,
        "weights": layer.config.weights,
        "group_size": layer.group_size,
        "act_bits": layer.act.bits,
        "act_signed": layer.act.signed,
        "act_scale": layer.act.scale,
        "kernel": layer_encoding(layer),
        **kernel,
        "shape": list(layer.weight.shape),
    }


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"
