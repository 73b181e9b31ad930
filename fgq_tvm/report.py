"""What FGQ buys on a model: multiplications eliminated, storage, projected speed-up, and the
accuracy of each group size (``fgq-tvm report``).

Per quantized layer (:func:`layer_costs`):

* multiplications eliminated: a ternary layer multiplies once per group of ``N`` add/subtract
  terms (its group scale), so it eliminates ``1 - G / C`` of its multiplications (``G`` groups
  over ``C`` input channels: ``1 - 1/N`` when ``N`` divides ``C``), and with asymmetric scales
  twice per group (``1 - 2G / C``); 8-bit and float layers eliminate none. The model's share is
  weighted by each layer's multiply-accumulates (MACs).
* bits per weight: 2 per ternary value, plus its group scales (one or, asymmetric, two per
  group; 8 bits each for int8 scales and 32 per output channel for their float scale ``beta``;
  32 each for float scales); 8 plus 32 per output channel for 8-bit layers; 32 for float
  layers. Biases count in the model bytes.
* projected speed-up over FP32 (:class:`SpeedupModel`): the paper's accounting (Mellempudi et
  al., 2017), which projects about 9x at N=4 and 15x at N=64 with 8-bit activations.

The group-size sweep (:func:`sweep`) quantizes the model at each group size and activation
width with the rest of the configuration unchanged, and measures the top-1 accuracy of the
PyTorch reference of each on the same images as the full-precision model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .config import SWEEP_ACT_BITS, SWEEP_GROUP_SIZES, QuantConfig
from .evaluate import Accuracy, evaluate_models, torch_predictor
from .quant.layers import QuantizedLayer
from .quant.quantize import QuantizedModel, ReferenceLayer
from .reporting import output_folder, write_atomically, write_text_atomically

FP32_BITS = 32
Progress = Callable[[str], None]


@dataclass(frozen=True)
class SpeedupModel:
    """Projected time of a layer per MAC, relative to an FP32 MAC.

    An operation on ``b``-bit activations is taken to run ``32 / b`` times as fast as an FP32
    one (4x at 8 bits). A ternary layer spends, per MAC, ``add_cost`` of a low-precision MAC on
    the add or subtract that replaces it and one low-precision MAC per group for the scale:
    ``(add_cost * (1 - G/C) + G/C) * b / 32``. With the default ``add_cost = 1/4`` this
    reproduces the paper's projections for 8-bit activations: ``4 / (1/4 + 3/(4N))``, 9.1x at
    N=4 and 15.3x at N=64 (16x as N grows). 8-bit weight layers run at ``b / 32``; float layers
    at 1.
    """

    add_cost: float = 0.25

    def time_per_mac(self, layer: LayerCost) -> float:
        if layer.weights == "float":
            return 1.0
        low_precision = layer.act_bits / FP32_BITS
        if layer.weights != "ternary":
            return low_precision
        multiplied = 1 - layer.multiplications_eliminated
        return (self.add_cost * (1 - multiplied) + multiplied) * low_precision

    def speedup(self, layers: Sequence[LayerCost]) -> float:
        """The model's projected speed-up over FP32: its MACs over their projected time."""
        macs = sum(layer.macs for layer in layers)
        return macs / sum(layer.macs * self.time_per_mac(layer) for layer in layers)


@dataclass(frozen=True)
class LayerCost:
    """One conv or linear layer's arithmetic and storage.

    Attributes
    ----------
    name, op
        Module path and ``"conv2d"`` or ``"linear"``.
    weights
        ``"ternary"``, ``"int8"`` or ``"float"``.
    group_size
        Input channels per group of a ternary layer (``None`` otherwise).
    act_bits
        Bits of the layer's input activations (32 for float layers).
    macs
        Multiply-accumulates of one image.
    weight_count
        Weights of the layer.
    multiplications_eliminated
        Fraction of its MACs that need no multiplication.
    weight_bits
        Bits its weights take with their scales.
    bias_count
        Outputs with a bias (stored as float32).
    """

    name: str
    op: str
    weights: str
    group_size: int | None
    act_bits: int
    macs: int
    weight_count: int
    multiplications_eliminated: float
    weight_bits: int
    bias_count: int

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / self.weight_count


def quantized_layer_cost(layer: QuantizedLayer, outputs_per_image: int) -> LayerCost:
    """The cost of ``layer``, whose output has ``outputs_per_image`` positions per channel."""
    k, c, r, s = layer.weight.shape
    weight_count = k * c * r * s
    if layer.is_ternary:
        scales_per_group = 2 if layer.asymmetric_scales else 1  # each one multiply per group
        scales = k * layer.num_groups * r * s * scales_per_group
        scale_bits = 32 * scales if layer.uses_group_scales else 8 * scales + 32 * k
        eliminated = 1 - layer.num_groups * scales_per_group / c
        bits = 2 * weight_count + scale_bits
    else:
        bits, eliminated = 8 * weight_count + 32 * k, 0.0
    return LayerCost(
        layer.name, layer.op, layer.config.weights, layer.group_size if layer.is_ternary else None,
        layer.act.bits, weight_count * outputs_per_image, weight_count, eliminated, bits, k,
    )  # fmt: skip


def float_layer_cost(name: str, module: nn.Module, outputs_per_image: int) -> LayerCost:
    """The cost of a conv or linear layer left in float."""
    count = module.weight.numel()
    op = "linear" if isinstance(module, nn.Linear) else "conv2d"
    bias = module.weight.shape[0] if module.bias is not None else 0
    macs = count * outputs_per_image
    return LayerCost(name, op, "float", None, 32, macs, count, 0.0, 32 * count, bias)


def layer_costs(quantized: QuantizedModel, input_shape: tuple[int, ...]) -> list[LayerCost]:
    """Every quantized and float conv or linear layer of ``quantized``, in module order, with
    its MACs for one image of ``input_shape``."""
    positions = _output_positions(quantized.reference, (1, *input_shape[1:]))
    costs = []
    for name, module in quantized.reference.named_modules():
        if name in quantized.layers and name in positions:
            costs.append(quantized_layer_cost(quantized.layers[name], positions[name]))
        elif name in quantized.float_layers and name in positions:
            costs.append(float_layer_cost(name, module, positions[name]))
    return costs


def _output_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """``module path -> output positions per channel`` of the conv and linear layers that one
    forward pass of a zero image reaches."""
    positions: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (ReferenceLayer, nn.Conv2d, nn.Linear)):

            def record(module, inputs, output, name=name):
                positions[name] = math.prod(output.shape[2:]) if output.dim() == 4 else 1

            hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return positions


@dataclass(frozen=True)
class SweepPoint:
    """The quantized model at one group size and activation width."""

    group_size: int
    act_bits: int
    accuracy: Accuracy
    multiplications_eliminated: float
    bits_per_weight: float
    projected_speedup: float


@dataclass(frozen=True)
class ModelReport:
    """What ``fgq-tvm report`` prints and writes.

    Attributes
    ----------
    model
        The model's name.
    config
        The quantization it was reported at (group size, activations, scales, method).
    layers
        :func:`layer_costs` at ``config``.
    fp32_bytes
        The float parameters of the conv and linear layers.
    speedup_model
        The projection's parameters.
    full_precision
        Top-1 and top-5 of the float model on the sweep's images (``None`` without a sweep).
    sweep
        One point per group size and activation width (empty without a sweep).
    images
        What the sweep was measured on.
    """

    model: str
    config: dict
    layers: list[LayerCost]
    fp32_bytes: int
    speedup_model: SpeedupModel
    full_precision: Accuracy | None = None
    sweep: tuple[SweepPoint, ...] = ()
    images: str = ""

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def multiplications_eliminated(self) -> float:
        return _eliminated(self.layers)

    @property
    def model_bytes(self) -> int:
        """Weights with their scales and float32 biases."""
        return sum(math.ceil(layer.weight_bits / 8) + 4 * layer.bias_count for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return _bits_per_weight(self.layers)


def _eliminated(layers: Sequence[LayerCost]) -> float:
    macs = sum(layer.macs for layer in layers)
    return sum(layer.macs * layer.multiplications_eliminated for layer in layers) / macs


def _bits_per_weight(layers: Sequence[LayerCost]) -> float:
    return sum(layer.weight_bits for layer in layers) / sum(layer.weight_count for layer in layers)


def float32_bytes(layers: Sequence[LayerCost]) -> int:
    """The layers' weights and biases in float32."""
    return sum(4 * (layer.weight_count + layer.bias_count) for layer in layers)


def sweep(
    model: nn.Module,
    quant: QuantConfig,
    quantize: Callable[[QuantConfig], QuantizedModel],
    images,
    input_shape: tuple[int, ...],
    group_sizes: Sequence[int] = SWEEP_GROUP_SIZES,
    act_bits: Sequence[int] = SWEEP_ACT_BITS,
    batch_size: int = 100,
    progress: Progress | None = None,
    speedup_model: SpeedupModel | None = None,
) -> tuple[Accuracy, list[SweepPoint]]:
    """Top-1 of the float model and of its quantized form at every group size and activation
    width, on the same images.

    Parameters
    ----------
    model
        The float model.
    quant
        The configuration every point starts from (``group_size`` and ``act_bits`` replaced).
    quantize
        Quantizes the model for a configuration (as :func:`fgq_tvm.compiler.quantize`).
    images
        :class:`~fgq_tvm.data.LabelledImages`.
    input_shape
        The model's input shape.
    group_sizes, act_bits
        The grid.
    batch_size
        Images per forward pass.
    progress
        Called with one line per point.
    speedup_model
        For the projected speed-up of each point (default :class:`SpeedupModel`).
    """
    report = progress or (lambda line: None)
    speedups = speedup_model or SpeedupModel()
    full = _accuracy(model, images, batch_size)
    points = []
    grid = [(bits, size) for bits in act_bits for size in group_sizes]
    for index, (bits, size) in enumerate(grid, start=1):
        quantized = quantize(replace(quant, group_size=size, act_bits=bits))
        costs = layer_costs(quantized, input_shape)
        accuracy = _accuracy(quantized.reference, images, batch_size)
        point = SweepPoint(
            size, bits, accuracy, _eliminated(costs), _bits_per_weight(costs),
            speedups.speedup(costs),
        )  # fmt: skip
        points.append(point)
        report(
            f"[{index}/{len(grid)}] N={size}, {bits}-bit activations: top-1 "
            f"{100 * accuracy.top1:.2f}% (full precision {100 * full.top1:.2f}%)"
        )
    return full, points


def _accuracy(model: nn.Module, images, batch_size: int) -> Accuracy:
    accuracies, _ = evaluate_models({"model": torch_predictor(model)}, images, batch_size)
    return accuracies["model"]


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_markdown(report: ModelReport, plot_name: str | None = None) -> str:
    """The report as markdown: totals, per-layer table, the sweep (and its plot)."""
    config = report.config
    speedup = report.speedup_model.speedup(report.layers)
    lines = [
        f"# {report.model}: what fine-grained ternarization buys",
        "",
        f"Configuration: N={config['group_size']}, {config['act_bits']}-bit activations, "
        f"{config['scales']} group scales, first/last layer {config['first_last']}, "
        f"method {config['method']}, activation ranges {config['calibration']}, BatchNorm "
        f"{config['batchnorm']}, reconstruction {config.get('reconstruction', 'off')}.",
        "",
        f"- multiply-accumulates per image: {report.macs / 1e6:.1f} M, of which "
        f"{100 * report.multiplications_eliminated:.1f}% need no multiplication",
        f"- weights: {report.bits_per_weight:.2f} bits each with their scales; model "
        f"{report.model_bytes / 1e6:.3f} MB against {report.fp32_bytes / 1e6:.3f} MB in FP32 "
        f"({report.model_bytes / report.fp32_bytes:.3f}x)",
        f"- projected speed-up over FP32: {speedup:.1f}x (the paper's model: an operation on "
        f"b-bit activations runs 32/b times as fast as FP32; an add that replaces a "
        f"multiply-accumulate costs {report.speedup_model.add_cost:g} of one)",
        "",
        _table(
            (
                "layer",
                "op",
                "weights",
                "N",
                "act bits",
                "MMACs",
                "mult. eliminated",
                "bits/weight",
                "projected speed-up",
            ),
            [
                [
                    layer.name,
                    layer.op,
                    layer.weights,
                    str(layer.group_size or ""),
                    str(layer.act_bits),
                    f"{layer.macs / 1e6:.2f}",
                    f"{100 * layer.multiplications_eliminated:.1f}%",
                    f"{layer.bits_per_weight:.2f}",
                    f"{1 / report.speedup_model.time_per_mac(layer):.1f}x",
                ]
                for layer in report.layers
            ],
        ),  # fmt: skip
    ]
    if report.sweep:
        lines += ["", *_sweep_section(report, plot_name)]
    return "\n".join(lines) + "\n"


def _sweep_section(report: ModelReport, plot_name: str | None) -> list[str]:
    full = report.full_precision
    rows = [
        [str(point.group_size), str(point.act_bits), f"{100 * point.accuracy.top1:.2f}",
         f"{100 * (full.top1 - point.accuracy.top1):.2f}",
         f"{100 * point.multiplications_eliminated:.1f}%", f"{point.bits_per_weight:.2f}",
         f"{point.projected_speedup:.1f}x"]
        for point in report.sweep
    ]  # fmt: skip
    lines = [
        "## Accuracy against group size",
        "",
        f"Top-1 on {report.images}; full precision {100 * full.top1:.2f}%. Every point is the "
        "configuration above with N and the activation bits replaced (first and last layer "
        "unchanged), run as the PyTorch reference of the quantized arithmetic.",
        "",
        _table(
            (
                "N",
                "act bits",
                "top-1 %",
                "drop (points)",
                "mult. eliminated",
                "bits/weight",
                "projected speed-up",
            ),
            rows,
        ),  # fmt: skip
    ]
    if plot_name:
        lines += ["", f"![top-1 against group size]({plot_name})"]
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def to_json(report: ModelReport) -> dict:
    """The report as JSON-ready data, with the totals."""
    data = asdict(report)
    data["speedup_model"] = asdict(report.speedup_model)
    data["totals"] = {
        "macs": report.macs,
        "multiplications_eliminated": report.multiplications_eliminated,
        "bits_per_weight": report.bits_per_weight,
        "model_bytes": report.model_bytes,
        "projected_speedup": report.speedup_model.speedup(report.layers),
    }
    return data


def plot_sweep(report: ModelReport, path: Path) -> None:
    """A PNG of top-1 against group size, one line per activation width, and the full-precision
    accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=120)
    for bits in sorted({point.act_bits for point in report.sweep}, reverse=True):
        points = [point for point in report.sweep if point.act_bits == bits]
        axes.plot(
            [point.group_size for point in points],
            [100 * point.accuracy.top1 for point in points],
            marker="o", label=f"ternary, {bits}-bit activations",
        )  # fmt: skip
    axes.axhline(100 * report.full_precision.top1, linestyle="--", color="gray", label="FP32")
    axes.set_xscale("log", base=2)
    sizes = sorted({point.group_size for point in report.sweep})
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.set_xlabel("group size N (input channels per scale)")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(f"{report.model}: top-1 on {report.images}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    write_atomically(path, lambda file: figure.savefig(file, format="png"))
    pyplot.close(figure)


def write_report(report: ModelReport, out_dir: Path) -> list[Path]:
    """``<model>.md``, ``<model>.json`` and (with a sweep) ``<model>-sweep.png`` in
    ``out_dir``, each written atomically; returns their paths.

    Raises
    ------
    FGQError
        ``out_dir`` exists and is not a folder, or cannot be created.
    """
    output_folder(out_dir)
    paths = []
    plot_name = None
    if report.sweep:
        plot = out_dir / f"{report.model}-sweep.png"
        plot_sweep(report, plot)
        plot_name = plot.name
        paths.append(plot)
    markdown = out_dir / f"{report.model}.md"
    write_text_atomically(markdown, format_markdown(report, plot_name))
    data = out_dir / f"{report.model}.json"
    write_text_atomically(data, json.dumps(to_json(report), indent=2) + "\n")
    return [markdown, data, *paths]
