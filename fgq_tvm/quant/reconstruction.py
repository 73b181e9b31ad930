"""Block-wise reconstruction of the quantized layers against the full-precision network.

After GPTQ has ternarized the layers and BatchNorm has been corrected and folded,
:func:`reconstruct_blocks` revisits the network one unit at a time, in the order the units run.
A unit is a residual block (:data:`BLOCK_TYPES`: the CIFAR ResNets' ``BasicBlock``, torchvision's
``BasicBlock`` and ``Bottleneck``) or, for a quantized layer outside every block (the stem, the
classifier, every layer of other models), that layer alone. Each unit gets its input from the
quantized network as reconstructed so far, and its target, the full-precision unit's output, from
the full-precision network (BatchNorm folded with its trained statistics). Two steps:

1. Rounding (:attr:`ReconstructionConfig.rounding`). Each ternary layer of the unit, in the order
   they run, is ternarized again with GPTQ (:func:`~fgq_tvm.quant.gptq.ternarize_gptq`), now
   against the full-precision layer's output instead of its own float weights: with ``X_q`` the
   layer's inputs in the quantized network, quantized as deployed, ``X_f`` the full-precision
   layer's inputs and ``W_f`` its weights, ``||W X_q - W_f X_f||^2`` is, up to a constant,
   ``||(W - W*) X_q||^2`` with the least-squares target ``W* = W_f X_f X_q^T (X_q X_q^T)^-1``
   (the inverse damped like GPTQ's). GPTQ rounds ``W*`` against the Hessian ``X_q X_q^T``, so
   the rounding decisions (which weights are 0, which are +-1) and the group scales also absorb
   the error that the quantized layers before it left in ``X_q``. Then the layer's bias is
   corrected by the mean difference of its output against the full-precision layer's. 8-bit
   layers keep their rounding.
2. Scales and biases (:attr:`ReconstructionConfig.iterations`). The unit's group scales (each
   sign's, with asymmetric scales), the 8-bit layers' channel scales (both through their
   logarithm) and the biases learn by Adam with a cosine learning rate, on the mean squared error
   of the unit's output against the full-precision unit's output, divided by that output's mean
   square. The forward pass computes the deployed numbers: every layer's input quantized by its
   :class:`~fgq_tvm.quant.layers.ActQuant`, int8 group scales rounded to their int8 grid against
   the filter's largest scale, both straight-through. With
   :attr:`~ReconstructionConfig.drop_probability` above 0, each element of the unit's input and
   of its layers' inputs is used unquantized with that probability (QDrop).

A unit whose loss (deployed numbers, all calibration images) would not go down keeps its layers.
The result is a set of :class:`~fgq_tvm.quant.layers.QuantizedLayer` records in their original
form (ternary values in {-1, 0, 1}, the layer's scale mode and group size, the activation
quantizers unchanged), so :func:`~fgq_tvm.quant.layers.reference_forward` and the compiled
module compute their numbers as before.

Gradient-learned rounding (AdaRound's relaxation ``t = d * h``, ``h`` in [0, 1] pushed to 0 or
1 by an annealed regularizer) was measured in place of step 1 and lost: a ternary weight's two
choices lie a whole scale apart, the relaxed optimum keeps many ``h`` far from 0 and 1, and its
rounding left the block loss above that of GPTQ's rounding.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ..errors import FGQError
from ..models import BasicBlock as CifarBasicBlock
from .gptq import DAMPING, _unfold, ternarize_gptq
from .layers import QuantizedLayer, expand_groups
from .observe import run_hooked
from .ternary import INT8_MAX, TernaryGroups

BLOCK_TYPES = (
    CifarBasicBlock,
    torchvision.models.resnet.BasicBlock,
    torchvision.models.resnet.Bottleneck,
)
EVALUATION_BATCH = 64  # images per forward pass when a unit's loss is measured
UNFOLDED_ELEMENTS = 1 << 25  # most elements of a layer's unfolded inputs held at once (step 1)


@dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of :func:`reconstruct_blocks`.

    Attributes
    ----------
    rounding
        Ternarize each ternary layer again against the full-precision layer's output (step 1).
    damping
        Fraction of the mean diagonal of ``X_q X_q^T`` added to its diagonal in step 1.
    iterations
        Adam steps per unit of step 2; 0 skips it.
    batch_size
        Calibration images per step.
    scale_lr, bias_lr
        Peak learning rates of the scale logarithms and of the biases; 0 keeps them.
    drop_probability
        QDrop's probability, per element and step, that an activation is used unquantized,
        in [0, 1).
    seed
        Seed of the batch sampling and of the drop masks.
    """

    rounding: bool = True
    damping: float = DAMPING
    iterations: int = 300
    batch_size: int = 32
    scale_lr: float = 1e-2
    bias_lr: float = 1e-2
    drop_probability: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.batch_size < 1:
            raise FGQError(
                f"reconstruction needs iterations >= 0 and batch_size >= 1, got "
                f"iterations={self.iterations}, batch_size={self.batch_size}"
            )
        rates = {"damping": self.damping, "scale_lr": self.scale_lr, "bias_lr": self.bias_lr}
        for name, value in rates.items():
            if not (math.isfinite(value) and value >= 0):
                raise FGQError(f"reconstruction {name} must be finite and >= 0, got {value}")
        if not 0 <= self.drop_probability < 1:
            raise FGQError(
                f"reconstruction drop_probability must be in [0, 1), got {self.drop_probability}"
            )


def reconstruct_blocks(
    layers: Mapping[str, QuantizedLayer],
    quantized_model: nn.Module,
    float_model: nn.Module,
    calib_batches: Sequence[torch.Tensor],
    config: ReconstructionConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, QuantizedLayer]:
    """Improve the quantized layers unit by unit against the full-precision network (see the
    module docstring).

    Parameters
    ----------
    layers
        ``module path -> QuantizedLayer`` of every quantized layer, BatchNorm folded.
    quantized_model
        The network that ``layers`` quantize, BatchNorm folded (the modules at their paths are
        replaced here; the network is not modified).
    float_model
        The full-precision network with BatchNorm folded (its trained statistics), with the same
        module paths; not modified.
    calib_batches
        Model inputs; each unit's inputs and outputs on all of them are held in memory.
    config
        The settings; :class:`ReconstructionConfig`'s defaults when omitted.
    progress
        Called once per unit with its path, how many layers it has and its loss (the mean
        squared error of its output, relative to the full-precision output's mean square)
        before and after.

    Returns
    -------
    dict
        ``module path -> QuantizedLayer`` with the keys of ``layers``, each in its layer's form.

    Raises
    ------
    FGQError
        No calibration batch.
    """
    config = config or ReconstructionConfig()
    if not calib_batches:
        raise FGQError("reconstruction needs at least one calibration batch")
    report = progress or (lambda line: None)
    float_model = float_model.eval()
    work = copy.deepcopy(quantized_model).eval()
    learnable = {name: LearnableLayer(layer) for name, layer in layers.items()}
    for name, module in learnable.items():
        work.set_submodule(name, module)
    generator = torch.Generator().manual_seed(config.seed)
    units = _units(work, list(learnable), calib_batches[0])
    for index, (unit_name, members) in enumerate(units.items(), 1):
        unit = _UnitData(
            work.get_submodule(unit_name),
            float_model.get_submodule(unit_name),
            _unit_io(work, work.get_submodule(unit_name), calib_batches)[0],
            *_unit_io(float_model, float_model.get_submodule(unit_name), calib_batches),
        )
        before = unit.loss()
        saved = {name: learnable[name].record for name in members}
        if config.rounding:
            for name in members:
                _resolve_rounding(unit, name, learnable[name], float_model, config.damping)
        if config.iterations:
            _learn_scales_and_biases(unit, [learnable[name] for name in members], config, generator)
        after = unit.loss()
        if after >= before:
            for name, record in saved.items():
                learnable[name].reset(record)
            after = before
        report(
            f"unit {index}/{len(units)} {unit_name} ({len(members)} layers): "
            f"loss {before:.4g} -> {after:.4g}"
        )
    return {name: learnable[name].record for name in layers}


class LearnableLayer(nn.Module):
    """A :class:`QuantizedLayer` as a module that computes its deployed numbers in float32 and
    whose scales (through their logarithms) and bias can learn.

    Parameters
    ----------
    layer
        The record.
    """

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.learning = False
        self.drop_probability = 0.0
        self.generator: torch.Generator | None = None
        self.log_factors = nn.ParameterList()
        self.bias = nn.Parameter(torch.empty(0))
        self.reset(layer)

    def reset(self, layer: QuantizedLayer) -> None:
        """Make ``layer`` the record: its scales become the reference that the learned factors
        multiply (all factors 1), its bias the learned bias."""
        self.record = layer
        self.register_buffer("values", torch.from_numpy(layer.weight.astype(np.float32)))
        self.initial_scales = _scales(layer)
        with torch.no_grad():
            self.log_factors = nn.ParameterList(
                nn.Parameter(torch.zeros(scale.shape)) for scale in self.initial_scales
            )
            self.bias = nn.Parameter(torch.from_numpy(layer.bias.astype(np.float32)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.record.act
        scale = torch.tensor(act.scale, dtype=torch.float32)
        levels = torch.clamp(x / scale, act.qmin, act.qmax)
        quantized = _straight_through(torch.round(levels), levels) * scale
        if self.learning and self.drop_probability > 0:
            dropped = _drop_mask(x, self.drop_probability, self.generator)
            quantized = torch.where(dropped, x, quantized)
        if self.learning:
            weight, bias = self.values * self._weight_scales(), self.bias
        else:
            weight, bias = self.deployed_weight(), torch.from_numpy(self.record.bias)
        layer = self.record
        if layer.op == "linear":
            return F.linear(quantized, weight[:, :, 0, 0], bias)
        return F.conv2d(quantized, weight, bias, layer.stride, layer.padding, layer.dilation)

    def deployed_weight(self) -> torch.Tensor:
        """The float32 weight ``[K, C, R, S]`` that the record deploys."""
        layer = self.record
        if layer.uses_group_scales:
            alpha = expand_groups(layer.group_scale, layer.group_size, layer.weight.shape[1])
            return torch.from_numpy((layer.weight * alpha).astype(np.float32))
        channel_scale = layer.channel_scale[:, None, None, None].astype(np.float64)
        return torch.from_numpy((layer.integer_weight() * channel_scale).astype(np.float32))

    def _weight_scales(self) -> torch.Tensor:
        """Each weight's scale ``[K, C, R, S]`` as the record would store it (int8 group scales
        rounded against the filter's largest, straight-through)."""
        layer = self.record
        scales = [
            initial.float() * torch.exp(factor)
            for initial, factor in zip(self.initial_scales, self.log_factors, strict=True)
        ]
        if not layer.is_ternary:
            return scales[0][:, None, None, None]
        if not layer.uses_group_scales:
            beta = (torch.cat(scales, dim=1).amax(dim=(1, 2, 3)) / INT8_MAX).detach()
            beta = beta[:, None, None, None]
            scales = [
                _straight_through(torch.clamp(torch.round(s / beta), 0, INT8_MAX) * beta, s)
                for s in scales
            ]
        channels = layer.weight.shape[1]
        expanded = [s.repeat_interleave(layer.group_size, dim=1)[:, :channels] for s in scales]
        return expanded[0] if len(expanded) == 1 else torch.where(self.values < 0, *expanded[::-1])

    def export(self) -> QuantizedLayer:
        """The record with the learned scales and bias, in the layer's form (scales that did
        not move are kept as stored)."""
        layer = self.record
        with torch.no_grad():
            bias = self.bias.detach().numpy().astype(np.float32).copy()
            if not any(factor.any() for factor in self.log_factors):
                return dataclasses.replace(layer, bias=bias)
            scales = [
                (initial * torch.exp(factor.double())).numpy().astype(np.float32)
                for initial, factor in zip(self.initial_scales, self.log_factors, strict=True)
            ]
        if not layer.is_ternary:
            return dataclasses.replace(layer, channel_scale=scales[0], bias=bias)
        groups = TernaryGroups(layer.weight, *_pair(scales), layer.group_size)
        return _with_ternary(layer, groups, bias)


def _scales(layer: QuantizedLayer) -> list[torch.Tensor]:
    """The float64 scales of a record: an 8-bit layer's channel scales ``[K]``, a ternary
    layer's group scales ``[positive]`` or ``[positive, negative]`` (``[K, G, R, S]``)."""
    if not layer.is_ternary:
        return [torch.from_numpy(layer.channel_scale.astype(np.float64))]
    if layer.uses_group_scales:
        return [torch.from_numpy(layer.group_scale.astype(np.float64))]
    beta = layer.channel_scale.astype(np.float64)[:, None, None, None]
    quantized = [layer.group_scale_q]
    if layer.asymmetric_scales:
        quantized.append(layer.negative_scale_q)
    return [torch.from_numpy(q.astype(np.float64) * beta) for q in quantized]


def _pair(scales: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """``(positive, negative)`` from one or two scale arrays."""
    return scales[0], (scales[1] if len(scales) > 1 else None)


def _with_ternary(layer: QuantizedLayer, groups: TernaryGroups, bias: np.ndarray) -> QuantizedLayer:
    """``layer`` with the ternary weight ``groups`` (in its scale mode) and ``bias``."""
    fields: dict[str, object] = {"weight": groups.values.astype(np.int8), "bias": bias}
    if layer.uses_group_scales:
        fields["group_scale"] = groups.positive.astype(np.float32)
    else:
        names = ("group_scale_q", "negative_scale_q", "channel_scale")
        fields.update(zip(names, groups.quantized_scales(), strict=True))
    return dataclasses.replace(layer, **fields)


def _straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` forward, the gradient of ``source`` backward."""
    return source + (value - source).detach()


def _drop_mask(
    like: torch.Tensor, probability: float, generator: torch.Generator | None
) -> torch.Tensor:
    """True where an element of ``like`` is used unquantized."""
    return torch.rand(like.shape, generator=generator) < probability


@dataclass
class _UnitData:
    """A unit in the quantized and the full-precision network, its inputs in both, and the
    full-precision output (the target)."""

    module: nn.Module
    float_module: nn.Module
    quantized_input: torch.Tensor
    float_input: torch.Tensor
    target: torch.Tensor

    def __post_init__(self) -> None:
        self.norm = self.target.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)

    def loss(self) -> float:
        """The mean squared error of the deployed unit on all inputs, relative to the target."""
        with torch.no_grad():
            chunks = self.quantized_input.split(EVALUATION_BATCH)
            output = torch.cat([self.module(chunk) for chunk in chunks])
        return float((output - self.target).pow(2).mean() / self.norm)


class _Stop(Exception):
    """Ends a forward pass once the watched module has run."""


def _run_until(
    model: nn.Module, module: nn.Module, inputs: Iterable[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each of ``inputs``, run ``model`` (without gradients) only until ``module`` has run,
    and yield ``module``'s input and output."""
    captured = []

    def capture(watched, args, output):
        captured.append((args[0].detach(), output.detach()))
        raise _Stop

    handle = module.register_forward_hook(capture)
    try:
        for x in inputs:
            with torch.no_grad(), contextlib.suppress(_Stop):
                model(x)
            if captured:
                yield captured.pop()
    finally:
        handle.remove()


def _unit_io(
    model: nn.Module, unit: nn.Module, batches: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and the output of ``unit`` over all ``batches`` (concatenated)."""
    inputs, outputs = zip(*_run_until(model, unit, batches), strict=True)
    return torch.cat(inputs), torch.cat(outputs)


def _units(model: nn.Module, names: list[str], batch: torch.Tensor) -> dict[str, list[str]]:
    """``unit path -> its quantized layers' paths``, units in the order they first run."""
    blocks = [path for path, module in model.named_modules() if isinstance(module, BLOCK_TYPES)]
    owner = {}
    for name in names:
        containing = [path for path in blocks if name.startswith(f"{path}.")]
        owner[name] = containing[0] if containing else name
    modules = {model.get_submodule(unit): unit for unit in owner.values()}
    order: list[str] = []

    def record(module, args):
        if modules[module] not in order:
            order.append(modules[module])

    run_hooked(model, batch, modules, record, pre=True)
    return {unit: [name for name in names if owner[name] == unit] for unit in order}


def _resolve_rounding(
    unit: _UnitData, name: str, layer: LearnableLayer, float_model: nn.Module, damping: float
) -> None:
    """Step 1 for one layer of ``unit``: GPTQ on the least-squares target, then bias correction."""
    record = layer.record
    if not record.is_ternary:
        return
    float_layer = float_model.get_submodule(name)
    act = record.act
    scale = np.float32(act.scale)
    chunk = _images_per_chunk(unit.quantized_input, record)
    pairs = zip(
        _run_until(unit.module, layer, unit.quantized_input.split(chunk)),
        _run_until(unit.float_module, float_layer, unit.float_input.split(chunk)),
        strict=True,
    )
    hessian = cross = None
    columns = 0
    quantized_mean = float_mean = 0
    for (quantized_input, _), (float_input, _) in pairs:
        quantized = act.quantize(quantized_input) * scale
        unfolded_q = _unfold(float_layer, quantized, record.padding)
        unfolded_f = _unfold(float_layer, float_input, record.padding)
        hessian = (unfolded_q @ unfolded_q.T).double() + (0 if hessian is None else hessian)
        cross = (unfolded_f @ unfolded_q.T).double() + (0 if cross is None else cross)
        columns += unfolded_q.shape[1]
        float_mean = float_mean + unfolded_f.double().sum(dim=1)
        quantized_mean = quantized_mean + unfolded_q.double().sum(dim=1)
    hessian, cross = hessian / columns, cross / columns
    weight = float_layer.weight.detach().double().reshape(record.weight.shape)
    k, c, r, s = weight.shape
    rows = weight.permute(0, 2, 3, 1).reshape(k, r * s * c)
    identity = torch.eye(len(hessian), dtype=hessian.dtype)
    damped = hessian + damping * torch.diagonal(hessian).mean() * identity
    target_rows = torch.linalg.solve(damped, (rows @ cross).T).T
    target = target_rows.reshape(k, r, s, c).permute(0, 3, 1, 2).numpy()
    asymmetric = record.asymmetric_scales
    groups = ternarize_gptq(target, hessian.numpy(), record.group_size, asymmetric, damping)
    layer.reset(_with_ternary(record, groups, record.bias))
    solved_rows = layer.deployed_weight().double().permute(0, 2, 3, 1).reshape(k, r * s * c)
    float_bias = 0 if float_layer.bias is None else float_layer.bias.detach().double()
    bias = rows @ (float_mean / columns) + float_bias - solved_rows @ (quantized_mean / columns)
    layer.reset(dataclasses.replace(layer.record, bias=bias.numpy().astype(np.float32)))


def _images_per_chunk(unit_input: torch.Tensor, record: QuantizedLayer) -> int:
    """Images whose unfolded layer inputs (about the unit input's size per image times the
    kernel's positions) stay within :data:`UNFOLDED_ELEMENTS`."""
    per_image = unit_input[0].numel() * record.weight.shape[2] * record.weight.shape[3]
    return max(1, UNFOLDED_ELEMENTS // per_image)


def _learn_scales_and_biases(
    unit: _UnitData,
    members: list[LearnableLayer],
    config: ReconstructionConfig,
    generator: torch.Generator,
) -> None:
    """Step 2 for ``unit``: Adam on its layers' scale logarithms and biases."""
    groups = [
        ([factor for member in members for factor in member.log_factors], config.scale_lr),
        ([member.bias for member in members], config.bias_lr),
    ]
    learned = [{"params": params, "lr": lr} for params, lr in groups if lr > 0]
    if not learned:
        return
    optimizer = torch.optim.Adam(learned)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.iterations)
    for member in members:
        member.learning = True
        member.drop_probability = config.drop_probability
        member.generator = generator
    count = len(unit.target)
    try:
        for _ in range(config.iterations):
            picked = torch.randint(count, (min(config.batch_size, count),), generator=generator)
            x = unit.quantized_input[picked]
            if config.drop_probability > 0:
                dropped = _drop_mask(x, config.drop_probability, generator)
                x = torch.where(dropped, unit.float_input[picked], x)
            loss = (unit.module(x) - unit.target[picked]).pow(2).mean() / unit.norm
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        for member in members:
            member.learning = False
    for member in members:
        member.reset(member.export())
