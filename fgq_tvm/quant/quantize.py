"""The quantization driver: a float PyTorch model in, quantized layer records and a reference out.

:func:`quantize_model` runs these steps on a deep copy of the model:

1. Pick the layers: every ``nn.Conv2d`` and ``nn.Linear`` that the first calibration batch
   reaches, in module order. The first is the "first" and the last the "last" layer of
   :meth:`QuantConfig.for_layer`. Layers that are never reached, layers whose config says
   ``float``, grouped convs, convs with a non-zero padding mode or an asymmetric ``'same'``
   padding stay in float (``QuantizedModel.float_layers`` says why).
2. Ternarize the ternary layers' raw weights (before BatchNorm folding) and put ``t * alpha``
   into the copy, which is then the ternary network. int8 layers keep float weights here.
3. Correct (or re-estimate) the BatchNorm statistics of that network on the calibration batches
   (``config.batchnorm``).
4. Calibrate the input range of every quantized layer on the calibration batches (ternary
   weights, float activations).
5. Put the original weights back and fold BatchNorm: that is ``folded_model``. A ternary
   layer's record is folded without re-ternarizing (``t_f = t * sign(factor)``, scales
   ``* |factor|``: :meth:`TernaryGroups.folded`); an int8 layer quantizes its folded float
   weight.
6. Build one :class:`~fgq_tvm.quant.layers.QuantizedLayer` per quantized layer.
7. With ``config.reconstruction == "block"``, improve the records block by block against the
   full-precision network, BatchNorm folded with its trained statistics
   (:func:`~fgq_tvm.quant.reconstruction.reconstruct_blocks`); their biases go into
   ``folded_model``.
8. Build the ``reference`` model, whose quantized layers compute :func:`reference_forward` and
   whose average-pooling modules sum in float64 (:class:`Float64Average`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..config import LayerConfig, QuantConfig
from ..errors import FGQError
from .batchnorm import (
    BATCHNORMS,
    batchnorm_affine,
    correct_batchnorm,
    find_conv_bn_pairs,
    fold_batchnorm,
    reestimate_batchnorm,
)
from .calibration import calibrate_inputs, make_act_quant
from .gptq import HessianObserver, ternarize_gptq
from .layers import ActQuant, QuantizedLayer, reference_forward
from .observe import observe_inputs, run_hooked
from .reconstruction import ReconstructionConfig, reconstruct_blocks
from .ternary import TernaryGroups, quantize_int8_per_channel, ternarize_groups

Progress = Callable[[str], None]

UNREACHED = "not reached by the calibration data"
# GPTQ: ternary layers whose Hessians one pass over the calibration batches collects. A pass
# costs a forward up to the run's last layer, most of GPTQ's time on ImageNet models; with 4
# instead of 1 the CIFAR ResNets' drops moved by less than their noise (ResNet-20 N=4 0.94 vs
# 1.44, N=64 4.60 vs 4.92; ResNet-56 N=64 4.84 vs 4.80: eval split, scratch runs).
LAYERS_PER_PASS = 4
AVERAGE_POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


@dataclass
class QuantizedModel:
    """The result of :func:`quantize_model`.

    Attributes
    ----------
    folded_model
        The model with BatchNorm folded into the convs (statistics re-estimated on the ternary
        network when the config says so) and the original float weights, in eval mode: the graph
        that is exported. Its conv and linear modules keep their original module paths, and the
        folded biases of the quantized layers equal their records' biases. With re-estimated
        statistics it is not equivalent to the input model (those statistics belong to the
        ternary network).
    reference
        A copy of ``folded_model`` whose quantized layers are :class:`ReferenceLayer`\\ s; its
        output defines the numbers that the compiled module must reproduce.
    layers
        ``module path -> QuantizedLayer`` of every quantized layer, in module order.
    float_layers
        ``module path -> reason`` of every conv or linear layer left in float.
    config
        The configuration the model was quantized with.
    """

    folded_model: nn.Module
    reference: nn.Module
    layers: dict[str, QuantizedLayer]
    float_layers: dict[str, str]
    config: QuantConfig


class ReferenceLayer(nn.Module):
    """A quantized conv or linear layer computing :func:`reference_forward` in eager PyTorch."""

    def __init__(self, layer: QuantizedLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference_forward(self.layer, x)

    def extra_repr(self) -> str:
        layer = self.layer
        return f"{layer.op}, weights={layer.config.weights}, group_size={layer.group_size}"


@dataclass
class _Plan:
    """A layer that will be quantized, with its resolved config and padding."""

    module: nn.Conv2d | nn.Linear
    config: LayerConfig
    padding: tuple[int, int]


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    calib_batches: list[torch.Tensor],
    progress: Progress | None = None,
    reconstruction: ReconstructionConfig | None = None,
) -> QuantizedModel:
    """Quantize the conv and linear layers of ``model`` (see the module docstring for the steps).

    Parameters
    ----------
    model
        A float32 CPU model; it is not modified.
    config
        The quantization settings.
    calib_batches
        Model inputs used to re-estimate BatchNorm statistics and to calibrate activations.
    progress
        Called with the name of each stage as it starts (and, while blocks are reconstructed,
        with a line per block).
    reconstruction
        The settings of ``config.reconstruction == "block"`` (default:
        :class:`~fgq_tvm.quant.reconstruction.ReconstructionConfig`'s defaults).

    Returns
    -------
    QuantizedModel
        The folded float model, the reference model and the layer records.
    """
    if not calib_batches:
        raise FGQError("quantization needs at least one calibration batch")
    report = progress or _ignore
    work = copy.deepcopy(model).eval()
    plans, float_layers = _plan_layers(work, config, calib_batches[0])
    report("ternarize")
    if config.method == "gptq":
        ternary, originals = _ternarize_compensating(work, plans, calib_batches)
    else:
        ternary = _ternarize(plans, config.method)
        originals = _swap_weights(plans, ternary)
    if config.batchnorm != "keep" and any(isinstance(m, BATCHNORMS) for m in work.modules()):
        report(f"{config.batchnorm} batchnorm")
        if config.batchnorm == "correct":
            correct_batchnorm(work, copy.deepcopy(model), calib_batches)
        else:
            reestimate_batchnorm(work, calib_batches)
    report("calibrate")
    bits = {name: plan.config.act_bits for name, plan in plans.items()}
    ranges = calibrate_inputs(
        work, list(plans), calib_batches, config.calibration, config.percentile, bits
    )
    _restore_weights(plans, originals)
    report("fold batchnorm")
    pairs = find_conv_bn_pairs(work)
    factors = {conv: batchnorm_affine(work.get_submodule(bn))[0] for conv, bn in pairs}
    fold_batchnorm(work, pairs)
    report("build layers")
    layers = {}
    for name, plan in plans.items():
        if name not in ranges:
            float_layers[name] = UNREACHED
            continue
        act = make_act_quant(*ranges[name], plan.config.act_bits)
        layers[name] = _build_layer(name, plan, act, ternary.get(name), factors.get(name))
    if config.reconstruction == "block":
        report("reconstruct blocks")
        float_model = fold_batchnorm(copy.deepcopy(model).eval())
        layers = reconstruct_blocks(
            layers, work, float_model, calib_batches, reconstruction, progress=report
        )
        _set_biases(work, layers)
    report("reference")
    reference = _reference_model(work, layers)
    return QuantizedModel(work, reference, layers, float_layers, config)


def _ignore(stage: str) -> None:
    """The default progress callback."""


def _plan_layers(
    model: nn.Module, config: QuantConfig, batch: torch.Tensor
) -> tuple[dict[str, _Plan], dict[str, str]]:
    """Resolve every conv/linear layer into a plan or a reason to stay in float."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    config.check_overrides([name for name, _ in found])
    reached = _reached(model, [module for _, module in found], batch)
    names = [name for name, module in found if module in reached]
    plans, float_layers = {}, {}
    for name, module in found:
        if module not in reached:
            float_layers[name] = UNREACHED
            continue
        layer_config = config.for_layer(name, is_first=name == names[0], is_last=name == names[-1])
        padding = _padding(module)
        reason = _float_reason(module, layer_config, padding)
        if reason:
            float_layers[name] = reason
        else:
            plans[name] = _Plan(module, layer_config, padding)
    return plans, float_layers


def _reached(model: nn.Module, modules: list[nn.Module], batch: torch.Tensor) -> set[nn.Module]:
    """The modules that run when the model runs ``batch``."""
    reached = set()
    run_hooked(model, batch, modules, lambda module, _: reached.add(module), pre=True)
    return reached


def _padding(module: nn.Module) -> tuple[int, int] | None:
    """The symmetric (top/bottom, left/right) padding; ``None`` for an asymmetric ``'same'``."""
    if isinstance(module, nn.Linear):
        return (0, 0)
    if module.padding == "valid":
        return (0, 0)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return None if any(t % 2 for t in totals) else (totals[0] // 2, totals[1] // 2)
    return tuple(module.padding)


def _float_reason(module: nn.Module, config: LayerConfig, padding: tuple | None) -> str | None:
    if config.weights == "float":
        return "config: float"
    if isinstance(module, nn.Linear):
        return None
    if module.groups != 1:
        return "grouped conv"
    if module.padding_mode != "zeros":
        return f"padding mode {module.padding_mode!r}"
    if padding is None:
        return "asymmetric 'same' padding"
    return None


def _weight4d(module: nn.Module) -> np.ndarray:
    """The module's float32 weight as ``[K, C, R, S]`` (linear: ``[K, C, 1, 1]``)."""
    weight = module.weight.detach().cpu().float().numpy()
    return weight.reshape(weight.shape + (1, 1)) if weight.ndim == 2 else weight


def _ternarize(plans: dict[str, _Plan], method: str) -> dict[str, TernaryGroups]:
    """The ternary layers' raw weights, ternarized."""
    result = {}
    for name, plan in plans.items():
        if plan.config.weights == "ternary":
            weight = _weight4d(plan.module)
            group_size = plan.config.resolved_group_size(weight.shape[1])
            asymmetric = plan.config.asymmetric_scales
            result[name] = ternarize_groups(weight, group_size, method, asymmetric)
    return result


def _ternarize_compensating(
    model: nn.Module, plans: dict[str, _Plan], batches: list[torch.Tensor]
) -> tuple[dict[str, TernaryGroups], dict[str, torch.Tensor]]:
    """:func:`~fgq_tvm.quant.gptq.ternarize_gptq` on the ternary layers in module order, in
    runs of :data:`LAYERS_PER_PASS`: one pass over the calibration batches takes the Hessians
    of a run's layers from the inputs they see with every earlier run already ternary (their
    weights swapped in as it goes); returns the ternary weights and the originals."""
    ternary, originals = {}, {}
    names = [name for name, plan in plans.items() if plan.config.weights == "ternary"]
    for first in range(0, len(names), LAYERS_PER_PASS):
        run = {name: plans[name] for name in names[first : first + LAYERS_PER_PASS]}
        observers = {name: HessianObserver(plan.module, plan.padding) for name, plan in run.items()}
        observe_inputs(
            model, {run[name].module: o.observe for name, o in observers.items()}, batches
        )
        for name, plan in run.items():
            weight = _weight4d(plan.module)
            group_size = plan.config.resolved_group_size(weight.shape[1])
            hessian, asymmetric = observers[name].result(), plan.config.asymmetric_scales
            ternary[name] = ternarize_gptq(weight, hessian, group_size, asymmetric)
        originals |= _swap_weights(run, {name: ternary[name] for name in run})
    return ternary, originals


def _swap_weights(
    plans: dict[str, _Plan], ternary: dict[str, TernaryGroups]
) -> dict[str, torch.Tensor]:
    """Put the dequantized ternary weights into their layers; returns the original weights."""
    originals = {}
    for name, groups in ternary.items():
        module = plans[name].module
        originals[name] = module.weight.detach().clone()
        ternary_weight = torch.from_numpy(groups.dequantize())
        with torch.no_grad():
            module.weight.copy_(ternary_weight.reshape(module.weight.shape))
    return originals


def _restore_weights(plans: dict[str, _Plan], originals: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, weight in originals.items():
            plans[name].module.weight.copy_(weight)


def _build_layer(
    name: str,
    plan: _Plan,
    act: ActQuant,
    ternary: TernaryGroups | None,
    factor: np.ndarray | None,
) -> QuantizedLayer:
    """The record of one layer; ``plan.module`` holds the folded float weight and bias."""
    module = plan.module
    weight = _weight4d(module)
    channels = weight.shape[1]
    fields: dict[str, object] = {}
    if ternary is None:
        fields["weight"], fields["channel_scale"] = quantize_int8_per_channel(weight)
        fields["group_size"] = channels
    else:
        folded = ternary if factor is None else ternary.folded(factor)
        fields["weight"], fields["group_size"] = folded.values, folded.group_size
        if plan.config.scales == "float":
            fields["group_scale"] = folded.positive
        else:
            scales = ("group_scale_q", "negative_scale_q", "channel_scale")
            fields.update(zip(scales, folded.quantized_scales(), strict=True))
    is_conv = isinstance(module, nn.Conv2d)
    return QuantizedLayer(
        name=name,
        op="conv2d" if is_conv else "linear",
        config=plan.config,
        act=act,
        bias=_bias(module),
        stride=tuple(module.stride) if is_conv else (1, 1),
        padding=plan.padding,
        dilation=tuple(module.dilation) if is_conv else (1, 1),
        **fields,
    )


def _set_biases(model: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    """Give each quantized layer's module its record's bias."""
    for name, layer in layers.items():
        module = model.get_submodule(name)
        module.bias = nn.Parameter(torch.from_numpy(layer.bias.copy()).to(module.weight.dtype))


def _bias(module: nn.Module) -> np.ndarray:
    out_features = module.weight.shape[0]
    if module.bias is None:
        return np.zeros(out_features, dtype=np.float32)
    return module.bias.detach().cpu().float().numpy().copy()


class Float64Average(nn.Module):
    """An average-pooling module that sums in float64 and rounds to float32 once.

    The compiled module averages the same way (``PromoteAveragesToFloat64``), so that both agree
    bit for bit on what feeds the next quantizer.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.double()).float()


def _reference_model(folded: nn.Module, layers: dict[str, QuantizedLayer]) -> nn.Module:
    reference = copy.deepcopy(folded)
    for name, layer in layers.items():
        reference.set_submodule(name, ReferenceLayer(layer))
    for name, module in list(reference.named_modules()):
        if isinstance(module, AVERAGE_POOLS):
            reference.set_submodule(name, Float64Average(module))
    return reference.eval()
