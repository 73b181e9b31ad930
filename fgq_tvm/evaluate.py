"""Accuracy of a quantized model against its full-precision original, on the same images.

:func:`evaluate_models` runs several predictors over one :class:`~fgq_tvm.data.LabelledImages`
set batch by batch (each batch is read once for all of them) and counts top-1 and top-5 hits.
The predictors are the float model, the quantized network as the PyTorch reference computes it
(:attr:`~fgq_tvm.quant.quantize.QuantizedModel.reference`) and, for the ``tvm`` backend, the
compiled module itself (:func:`module_predictor`): its accuracy is that of what is deployed,
and its top-1 agreement with the reference is reported beside it. :func:`evaluate_quantized`
does all of ``fgq-tvm eval``: quantize, compile if asked, evaluate.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from .data import LabelledImages

if TYPE_CHECKING:
    from tvm.target import Target

    from .config import QuantConfig
    from .models import ModelSpec
    from .quant.quantize import QuantizedModel

Predictor = Callable[[torch.Tensor], np.ndarray]  # normalised NCHW batch -> logits [B, classes]
Progress = Callable[[int, int], None]  # (images done, images in all)
Backend = Literal["torch", "tvm"]


@dataclass(frozen=True)
class Accuracy:
    """Top-1 and top-5 accuracy (fractions) over ``images`` images."""

    top1: float
    top5: float
    images: int


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a full-precision model and its quantized form on the same images.

    Attributes
    ----------
    full_precision, quantized
        Their accuracies.
    agreement
        For the ``tvm`` backend: the fraction of images whose top-1 class the compiled module
        and the PyTorch reference agree on; ``None`` otherwise.
    """

    full_precision: Accuracy
    quantized: Accuracy
    agreement: float | None = None

    @property
    def drop_top1(self) -> float:
        """Top-1 drop in percentage points (positive: the quantized model is worse)."""
        return 100 * (self.full_precision.top1 - self.quantized.top1)

    @property
    def drop_top5(self) -> float:
        return 100 * (self.full_precision.top5 - self.quantized.top5)


@dataclass(frozen=True)
class QuantizedEvaluation:
    """What :func:`evaluate_quantized` measured, and on what.

    Attributes
    ----------
    model
        The model's name.
    data, images
        The images evaluated on (their description) and how many.
    backend
        What ran the quantized network: ``"torch"`` (the PyTorch reference) or ``"tvm"`` (the
        compiled module).
    result
        The accuracies.
    """

    model: str
    data: str
    images: int
    backend: Backend
    result: EvalResult

    def heading(self) -> str:
        """The line above the accuracy table (:func:`format_result`)."""
        runner = "the compiled module" if self.backend == "tvm" else "the PyTorch reference"
        return (
            f"{self.model} on {self.images} images of {self.data}, quantized network run by "
            f"{runner}"
        )

    def record(
        self,
        quant: QuantConfig,
        layer_overrides: Sequence[str],
        weights: str | None,
        baseline_weights: str | None,
        calibration_images: int,
    ) -> dict:
        """The JSON record of ``fgq-tvm eval --json``.

        Parameters
        ----------
        quant
            The quantization evaluated.
        layer_overrides
            Its per-layer overrides as written (``--layer``).
        weights, baseline_weights
            The files the quantized and the full-precision model were loaded from (``None``:
            random weights; ``baseline_weights`` ``None``: those of ``weights``).
        calibration_images
            How many images the quantization was calibrated on.

        Returns
        -------
        dict
            JSON-ready values.
        """
        result = self.result
        models = {"full_precision": result.full_precision, "quantized": result.quantized}
        accuracy = {
            name: {"top1": value.top1, "top5": value.top5} for name, value in models.items()
        }
        return {
            "model": self.model,
            "data": self.data,
            "images": self.images,
            "backend": self.backend,
            "weights": weights,
            "baseline_weights": baseline_weights or weights,
            "quantization": vars(quant) | {"overrides": list(layer_overrides)},
            "calibration_images": calibration_images,
            **accuracy,
            "drop_top1_points": result.drop_top1,
            "drop_top5_points": result.drop_top5,
            "top1_agreement_with_reference": result.agreement,
        }


def default_batch_size(spec: ModelSpec) -> int:
    """Images per evaluation batch: 100 for inputs up to 64x64 pixels, else 10."""
    return 100 if max(spec.input_shape[2:]) <= 64 else 10


def evaluate_quantized(
    model: torch.nn.Module,
    spec: ModelSpec,
    quant: QuantConfig,
    calibration: torch.Tensor,
    images: LabelledImages,
    *,
    backend: Backend = "torch",
    target: Target | None = None,
    batch_size: int | None = None,
    tuning_logs: Path | None = None,
    baseline: torch.nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
    image_progress: Progress | None = None,
) -> QuantizedEvaluation:
    """Quantize ``model`` as compile would and measure it against the full-precision model.

    Parameters
    ----------
    model, spec
        The float model (eval mode) and its spec.
    quant, calibration
        The quantization and the normalised calibration images (as for
        :func:`~fgq_tvm.compiler.compile_model`).
    images
        The labelled images to evaluate on.
    backend
        ``"torch"``: the quantized network runs as the PyTorch reference; ``"tvm"``: it is
        compiled for ``target`` (at ``batch_size`` images, in a temporary folder) and the module
        runs, its top-1 agreement with the reference measured beside it.
    target
        The target of the compiled module (needed for ``"tvm"``).
    batch_size
        Images per batch, also the compiled module's batch; ``None``:
        :func:`default_batch_size`.
    tuning_logs
        Tuning databases of the compiled module (as for
        :func:`~fgq_tvm.compiler.compile_model`); ``None``: default schedules.
    baseline
        The full-precision model the drop is measured against; ``None``: ``model``.
    progress
        Called with a short description of each stage.
    image_progress
        Called with the images done and the images in all after each batch.

    Returns
    -------
    QuantizedEvaluation
    """
    from .compiler import quantize

    if backend == "tvm" and target is None:
        raise ValueError("the tvm backend needs a target")
    quantized = quantize(model, spec, quant, calibration, progress)
    baseline = model if baseline is None else baseline
    return evaluate_quantized_model(
        quantized, baseline, spec, images, backend=backend, target=target,
        batch_size=batch_size, tuning_logs=tuning_logs, progress=progress,
        image_progress=image_progress,
    )  # fmt: skip


def evaluate_quantized_model(
    quantized: QuantizedModel,
    baseline: torch.nn.Module,
    spec: ModelSpec,
    images: LabelledImages,
    *,
    backend: Backend = "torch",
    target: Target | None = None,
    batch_size: int | None = None,
    tuning_logs: Path | None = None,
    progress: Callable[[str], None] | None = None,
    image_progress: Progress | None = None,
) -> QuantizedEvaluation:
    """The second half of :func:`evaluate_quantized`: a network quantized already, measured
    against the full-precision ``baseline`` (the parameters are those of
    :func:`evaluate_quantized`)."""
    if backend == "tvm" and target is None:
        raise ValueError("the tvm backend needs a target")
    report = progress or (lambda stage: None)
    batch = batch_size or default_batch_size(spec)
    predictors = {
        "full": torch_predictor(baseline),
        "reference": torch_predictor(quantized.reference),
    }
    with tempfile.TemporaryDirectory(prefix="fgq-tvm-eval-") as folder:
        if backend == "tvm":
            module = Path(folder) / "model.so"
            predictors["module"] = _compiled_predictor(
                quantized, spec, target, batch, module, tuning_logs, progress
            )
        report(f"evaluate on {images.count} images of {images.description}")
        accuracies, top1 = evaluate_models(predictors, images, batch, image_progress)
    agreement = None
    if backend == "tvm":
        agreement = float((top1["module"] == top1["reference"]).mean())
    deployed = "module" if backend == "tvm" else "reference"
    result = EvalResult(accuracies["full"], accuracies[deployed], agreement)
    return QuantizedEvaluation(spec.name, images.description, images.count, backend, result)


def _compiled_predictor(
    quantized: QuantizedModel,
    spec: ModelSpec,
    target: Target,
    batch: int,
    output: Path,
    tuning_logs: Path | None,
    progress: Callable[[str], None] | None,
) -> Predictor:
    """The quantized network compiled at ``batch`` images into ``output``, as a predictor."""
    from .compiler import compile_quantized
    from .runtime import load

    if not spec.fixed_batch:
        spec = replace(spec, input_shape=(batch, *spec.input_shape[1:]))
    compile_quantized(quantized, spec, target, output, progress, tuning_logs)
    return module_predictor(load(output))


def torch_predictor(model: torch.nn.Module) -> Predictor:
    """``model`` in eval mode, without gradients."""
    model.eval()

    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return model(x).numpy()

    return predict


def module_predictor(module) -> Predictor:
    """A compiled module (:class:`~fgq_tvm.runtime.CompiledModel`) on batches of any size: a
    batch that is no multiple of the module's batch is padded with zeros, and the padding's
    logits dropped."""
    batch = module.input_shape[0]

    def predict(x: torch.Tensor) -> np.ndarray:
        images = x.numpy()
        missing = -len(images) % batch
        if missing:
            padding = np.zeros((missing, *images.shape[1:]), np.float32)
            images = np.concatenate([images, padding])
        return module(np.ascontiguousarray(images, dtype=np.float32))[: len(x)]

    return predict


def evaluate_models(
    predictors: Mapping[str, Predictor],
    images: LabelledImages,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[dict[str, Accuracy], dict[str, np.ndarray]]:
    """Top-1 and top-5 accuracy of each predictor on ``images``.

    Returns
    -------
    accuracies, top1
        ``name -> Accuracy`` and ``name -> predicted class of every image`` (in order).
    """
    hits1 = dict.fromkeys(predictors, 0)
    hits5 = dict.fromkeys(predictors, 0)
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    done = 0
    for x, labels in images.batches(batch_size):
        truth = labels.numpy()[:, None]
        for name, predict in predictors.items():
            logits = predict(x)
            top5 = np.argsort(-logits, axis=1, kind="stable")[:, :5]
            hits1[name] += int((top5[:, :1] == truth).sum())
            hits5[name] += int((top5 == truth).any(axis=1).sum())
            predictions[name].append(top5[:, 0])
        done += len(labels)
        if progress is not None:
            progress(done, images.count)
    accuracies = {
        name: Accuracy(hits1[name] / done, hits5[name] / done, done) for name in predictors
    }
    return accuracies, {name: np.concatenate(parts) for name, parts in predictions.items()}


def format_result(result: EvalResult, heading: str) -> str:
    """The accuracy table that ``fgq-tvm eval`` prints."""
    rows = [
        ("full precision", result.full_precision.top1, result.full_precision.top5),
        ("quantized", result.quantized.top1, result.quantized.top5),
    ]
    lines = [heading, f"{'':16}{'top-1':>9}{'top-5':>9}"]
    lines += [f"{name:16}{100 * top1:8.2f}%{100 * top5:8.2f}%" for name, top1, top5 in rows]
    lines.append(f"{'drop (points)':16}{result.drop_top1:9.2f}{result.drop_top5:9.2f}")
    if result.agreement is not None:
        lines.append(
            f"the compiled module and the PyTorch reference agree on the top-1 class of "
            f"{100 * result.agreement:.2f}% of the images"
        )
    return "\n".join(lines)
