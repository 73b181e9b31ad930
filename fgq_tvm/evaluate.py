"""Accuracy of a quantized model against its full-precision original, on the same images.

:func:`evaluate_models` runs several predictors over one :class:`~fgq_tvm.data.LabelledImages`
set batch by batch (each batch is read once for all of them) and counts top-1 and top-5 hits.
The predictors are the float model, the quantized network as the PyTorch reference computes it
(:attr:`~fgq_tvm.quant.quantize.QuantizedModel.reference`) and, for the ``tvm`` backend, the
compiled module itself (:func:`module_predictor`): its accuracy is that of what is deployed,
and its top-1 agreement with the reference is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .data import LabelledImages

Predictor = Callable[[torch.Tensor], np.ndarray]  # normalised NCHW batch -> logits [B, classes]
Progress = Callable[[int, int], None]  # (images done, images in all)


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
