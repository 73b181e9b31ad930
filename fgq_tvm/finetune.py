"""Straight-through-estimator fine-tuning of the quantized network (``fgq-tvm finetune``).

The network trains as ``compile`` will quantize it. Every layer that
:func:`~fgq_tvm.quant.quantize.quantize_model` quantizes computes its forward pass with the
weights ``compile`` gives it (ternary groups from the exact solver, int8 per output channel for
8-bit layers) on its input quantized to its activation bits (the scales ``compile`` calibrates
on the untrained network, kept fixed); the backward pass treats both quantizers as the identity
(the straight-through estimator), so the float weights underneath learn. BatchNorm trains as
usual. The loss is the cross entropy with the labels plus the KL divergence from the
full-precision model's output distribution (distillation), on the training images only, with
random crops and horizontal flips. The learning rate follows a cosine from its start to zero
over the epochs that fit the time budget (measured on the first epoch; training stops early if
later epochs run slower than that).

The result is a float model in the input model's architecture: ``compile --weights`` ternarizes
its weights again with the same solver, so the deployed network is the one trained here (its
BatchNorm statistics and activation scales re-estimated on the calibration images).
:func:`finetuned_accuracy` measures what the training bought, :func:`finetune_checkpoint` and
:func:`finetune_record` are what ``fgq-tvm finetune`` writes.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .evaluate import Accuracy, evaluate_models, torch_predictor
from .quant.layers import QuantizedLayer
from .quant.ternary import TernaryMethod, quantize_int8_per_channel, ternarize_groups

if TYPE_CHECKING:
    from .config import QuantConfig
    from .data import LabelledImages
    from .quant.quantize import QuantizedModel

Progress = Callable[[str], None]
ACCURACY_BATCH_SIZE = 100  # images per batch of finetuned_accuracy


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune`.

    Attributes
    ----------
    epochs
        Most passes over the training images.
    minutes
        Time budget: the epochs are cut to what fits, measured on the first.
    batch_size
        Images per step.
    learning_rate
        Start of the cosine schedule (SGD with momentum 0.9, no weight decay).
    distillation
        Weight of the KL divergence from the full-precision model (0: labels only).
    seed
        Seed of the shuffling and augmentation.
    """

    epochs: int = 60
    minutes: float = 30.0
    batch_size: int = 128
    learning_rate: float = 0.01
    distillation: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: mean loss, top-1 on the (augmented) training images, seconds since start."""

    epoch: int
    loss: float
    train_top1: float
    seconds: float


@dataclass
class FinetuneResult:
    """The fine-tuned float model (eval mode) and how training went."""

    model: nn.Module
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.epochs[-1].seconds if self.epochs else 0.0


class TernaryWeight(nn.Module):
    """Parametrization: the weight ternarized in groups (``method`` and ``asymmetric``: as
    :func:`~fgq_tvm.quant.ternary.ternarize_groups` takes them), straight-through."""

    def __init__(
        self, group_size: int, method: TernaryMethod = "exact", asymmetric: bool = False
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.method = method
        self.asymmetric = asymmetric

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        groups = ternarize_groups(weight.detach(), self.group_size, self.method, self.asymmetric)
        quantized = torch.from_numpy(groups.dequantize())
        return weight + (quantized.reshape(weight.shape) - weight).detach()


class Int8Weight(nn.Module):
    """Parametrization: the weight quantized to int8 per output channel, straight-through."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_int8_per_channel(weight.detach())
        shape = (-1,) + (1,) * (weight.dim() - 1)
        quantized = torch.from_numpy(q.astype(np.float32) * scale.reshape(shape))
        return weight + (quantized.reshape(weight.shape) - weight).detach()


def _input_quantizer(layer: QuantizedLayer):
    """Forward pre-hook: the layer's input fake-quantized with its calibrated quantizer."""
    act = layer.act

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]):
        x = inputs[0]
        quantized = act.quantize(x) * act.scale
        return (x + (quantized - x).detach(), *inputs[1:])

    return hook


def finetune(
    model: nn.Module,
    layers: dict[str, QuantizedLayer],
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig = FinetuneConfig(),
    progress: Progress | None = None,
    method: TernaryMethod = "exact",
) -> FinetuneResult:
    """Fine-tune ``model`` through its quantizers (see the module docstring).

    Parameters
    ----------
    model
        The float model; it is not modified.
    layers
        ``module path -> QuantizedLayer`` from quantizing ``model`` as compile does: which
        layers are ternary or int8, their group sizes and activation quantizers.
    images, labels
        The training images (normalised float32 NCHW) and their classes.
    config
        Epochs, time budget and optimiser settings.
    progress
        Called with one line per epoch.
    method
        The ternarizer ``compile`` will use on the result (``QuantConfig.method``).
    """
    report = progress or (lambda line: None)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).train()
    handles = _attach_quantizers(student, layers, method)
    parameters = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=config.learning_rate, momentum=0.9)
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    schedule = CosineSchedule(config.learning_rate, config.epochs * steps_per_epoch)
    result = FinetuneResult(student)
    planned, start = config.epochs, time.monotonic()
    try:
        while len(result.epochs) < planned and _fits(result.epochs, config.minutes * 60):
            loss, top1 = _train_epoch(
                student, teacher, optimizer, images, labels, config, generator, schedule
            )
            seconds = time.monotonic() - start
            if not result.epochs:  # the budget in epochs, from the first one's time
                planned = max(1, min(config.epochs, int(config.minutes * 60 // seconds)))
                schedule.total_steps = planned * steps_per_epoch
            result.epochs.append(EpochRecord(len(result.epochs) + 1, loss, top1, seconds))
            report(
                f"epoch {len(result.epochs)}/{planned}: loss {loss:.4f}, "
                f"train top-1 {100 * top1:.2f}%, {seconds / 60:.1f} min"
            )
    finally:
        _detach_quantizers(student, layers, handles)
    student.eval()
    return result


def finetune_settings(config: FinetuneConfig, quant: QuantConfig) -> dict[str, object]:
    """The settings a fine-tuned checkpoint and its record carry: the training settings and the
    quantization trained through (which ``compile`` must use on the checkpoint).

    Parameters
    ----------
    config
        The training settings.
    quant
        The quantization the network trained through.

    Returns
    -------
    dict[str, object]
        JSON-ready values.
    """
    return vars(config) | {
        "group_size": quant.group_size, "act_bits": quant.act_bits, "method": quant.method
    }  # fmt: skip


def finetune_checkpoint(result: FinetuneResult, settings: Mapping[str, object]) -> dict:
    """The checkpoint of a fine-tuned model: its state dict, which ``compile --weights`` loads,
    and its settings (:func:`finetune_settings`), for ``torch.save``."""
    return {"state_dict": result.model.state_dict(), "fgq_tvm_finetune": settings}


def finetune_record(
    model_name: str,
    training: str,
    settings: Mapping[str, object],
    result: FinetuneResult,
    accuracies: Mapping[str, Accuracy] | None = None,
) -> dict:
    """The JSON record of a fine-tuning run.

    Parameters
    ----------
    model_name
        The model's name.
    training
        The description of the training images.
    settings
        :func:`finetune_settings`.
    result
        The run.
    accuracies
        :func:`finetuned_accuracy`, if it was measured: recorded as top-1 per network.

    Returns
    -------
    dict
        JSON-ready values.
    """
    record = {"model": model_name, "training": training, "config": dict(settings)}
    record["epochs"] = [vars(epoch) for epoch in result.epochs]
    if accuracies is not None:
        record["accuracy"] = {name: accuracy.top1 for name, accuracy in accuracies.items()}
    return record


def finetuned_accuracy(
    model: nn.Module,
    before: QuantizedModel,
    after: QuantizedModel,
    images: LabelledImages,
    progress: Progress | None = None,
    image_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Accuracy]:
    """Accuracy of the full-precision model and of its quantized network before and after
    fine-tuning, on the same images.

    Parameters
    ----------
    model
        The full-precision model.
    before, after
        The model and the fine-tuned model, each quantized as compile would.
    images
        The labelled images (not those trained on).
    progress
        Called with a short description of each stage.
    image_progress
        Called with the images done and the images in all after each batch.

    Returns
    -------
    dict[str, Accuracy]
        ``"full precision"``, ``"quantized"`` and ``"quantized after fine-tuning"``, in order.
    """
    predictors = {
        "full precision": torch_predictor(model),
        "quantized": torch_predictor(before.reference),
        "quantized after fine-tuning": torch_predictor(after.reference),
    }
    if progress is not None:
        progress(f"evaluate on {images.count} images of {images.description}")
    accuracies, _ = evaluate_models(predictors, images, ACCURACY_BATCH_SIZE, image_progress)
    return accuracies


def format_finetuned_accuracy(accuracies: Mapping[str, Accuracy], images: LabelledImages) -> str:
    """The top-1 table of :func:`finetuned_accuracy`, each drop against the full-precision
    model's."""
    full = accuracies["full precision"].top1
    lines = [f"top-1 on {images.count} images of {images.description}:"]
    for name, accuracy in accuracies.items():
        drop = "" if name == "full precision" else f"  (drop {100 * (full - accuracy.top1):.2f})"
        lines.append(f"  {name:<28} {100 * accuracy.top1:6.2f}%{drop}")
    return "\n".join(lines)


def _fits(epochs: list[EpochRecord], budget_s: float) -> bool:
    """Whether one more epoch of the mean length so far ends within the budget (the slowed
    machine of a later epoch can cut the plan made on the first)."""
    if not epochs:
        return True
    return epochs[-1].seconds * (len(epochs) + 1) / len(epochs) <= budget_s


@dataclass
class CosineSchedule:
    """Learning rate from ``start`` down to zero along a half cosine over ``total_steps``."""

    start: float
    total_steps: int
    step: int = 0

    def next_rate(self) -> float:
        """The rate of the next step."""
        progress = min(self.step, self.total_steps) / self.total_steps
        self.step += 1
        return 0.5 * self.start * (1 + math.cos(math.pi * progress))


def _attach_quantizers(
    model: nn.Module, layers: dict[str, QuantizedLayer], method: TernaryMethod
) -> list:
    handles = []
    for name, layer in layers.items():
        module = model.get_submodule(name)
        ternary = TernaryWeight(layer.group_size, method, layer.config.asymmetric_scales)
        quantizer = ternary if layer.is_ternary else Int8Weight()
        parametrize.register_parametrization(module, "weight", quantizer)
        handles.append(module.register_forward_pre_hook(_input_quantizer(layer)))
    return handles


def _detach_quantizers(model: nn.Module, layers: dict[str, QuantizedLayer], handles) -> None:
    """The float weights back in place of their parametrizations; hooks removed."""
    for handle in handles:
        handle.remove()
    for name in layers:
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _train_epoch(
    student: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: FinetuneConfig,
    generator: torch.Generator,
    schedule: CosineSchedule,
) -> tuple[float, float]:
    """One pass over the shuffled, augmented images; returns mean loss and top-1."""
    order = torch.randperm(len(labels), generator=generator)
    total_loss = hits = 0.0
    for batch in order.split(config.batch_size):
        x, y = augment(images[batch], generator), labels[batch]
        rate = schedule.next_rate()
        for group in optimizer.param_groups:
            group["lr"] = rate
        with torch.no_grad():
            target = F.softmax(teacher(x), dim=1)
        logits = student(x)
        loss = F.cross_entropy(logits, y)
        if config.distillation:
            kl = F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
            loss = loss + config.distillation * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(y)
        hits += int((logits.argmax(1) == y).sum())
    return total_loss / len(labels), hits / len(labels)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crops (zero padding of 1/8 of the size on each side) and horizontal flips, one
    draw per image."""
    batch, _, height, width = x.shape
    pad_h, pad_w = height // 8, width // 8
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    rows = torch.randint(0, 2 * pad_h + 1, (batch,), generator=generator)
    cols = torch.randint(0, 2 * pad_w + 1, (batch,), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    crops = [
        padded[i, :, rows[i] : rows[i] + height, cols[i] : cols[i] + width] for i in range(batch)
    ]
    out = torch.stack(crops)
    out[flips] = out[flips].flip(-1)
    return out
