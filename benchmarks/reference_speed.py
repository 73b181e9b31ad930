"""The reference's integer sums: float32 convolutions (``integer_conv``) against float64 ones.

The pretrained CIFAR ResNet-20 with int8 group scales, quantized on the calibration split; each
quantized layer's sums on its own input for 100 eval images, computed both ways in the same
interleaved rounds (:func:`fgq_tvm.timing.time_rounds`), checked equal. Prints the median
milliseconds summed over the layers and their ratio, and writes them to
``benchmarks/results/<target key>/reference_speed.md``.

    PYTHONPATH=. python benchmarks/reference_speed.py
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from statistics import median

import numpy as np
import torch
import torch.nn.functional as F

from fgq_tvm.compiler import quantize
from fgq_tvm.config import QuantConfig
from fgq_tvm.data import data_dir, load_calibration, load_npz_split
from fgq_tvm.models import build_model
from fgq_tvm.quant.layers import integer_conv
from fgq_tvm.quant.quantize import ReferenceLayer
from fgq_tvm.target import host_target, parse_target, target_key
from fgq_tvm.timing import time_rounds

IMAGES = 100
ROUNDS = 5


def layer_inputs(quantized, images: torch.Tensor) -> list[tuple]:
    """``(layer, integer input)`` of each quantized layer of the reference on ``images``."""
    captured = []

    def capture(module, inputs, _output):
        x_q = module.layer.act.quantize(inputs[0])
        captured.append((module.layer, x_q[:, :, None, None] if x_q.dim() == 2 else x_q))

    hooks = [
        module.register_forward_hook(capture)
        for module in quantized.reference.modules()
        if isinstance(module, ReferenceLayer)
    ]
    with torch.no_grad():
        quantized.reference(images)
    for hook in hooks:
        hook.remove()
    return captured


def main() -> None:
    weights = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
    npz = data_dir() / "cifar10" / "cifar10_test_jpeg.npz"
    model, spec = build_model("cifar_resnet20", str(weights))
    spec = replace(spec, input_shape=(IMAGES, *spec.input_shape[1:]))
    calibration, _ = load_calibration(str(npz), spec, limit=128)
    quantized = quantize(model, spec, QuantConfig(scales="int8"), calibration)
    images, _ = load_npz_split(npz, "eval", spec, limit=IMAGES)
    layers = layer_inputs(quantized, images)

    def float32_sums():
        return [integer_conv(x_q, layer.integer_weight(), layer) for layer, x_q in layers]

    def float64_sums():
        return [
            F.conv2d(
                x_q.double(),
                torch.from_numpy(layer.integer_weight().astype(np.float64)),
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
            )
            for layer, x_q in layers
        ]

    assert all(torch.equal(a, b) for a, b in zip(float32_sums(), float64_sums(), strict=True))
    times = time_rounds({"float32": float32_sums, "float64": float64_sums}, ROUNDS, warmup=1)
    fast, slow = median(times["float32"]), median(times["float64"])
    table = (
        f"The integer sums of the {len(layers)} quantized layers of CIFAR ResNet-20 (int8 "
        f"scales) for {IMAGES} eval images, median of {ROUNDS} interleaved rounds, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; equal bit for bit.\n\n"
        "| sums | ms |\n|---|---|\n"
        f"| float32 convolutions (`integer_conv`) | {fast:.1f} |\n"
        f"| float64 convolutions | {slow:.1f} |\n"
        f"| float64 / float32 | {slow / fast:.2f}x |\n"
    )
    folder = Path(__file__).parent / "results" / target_key(parse_target(host_target()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reference_speed.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
