"""The kernel interface: what a quantized layer hands the kernel that computes it.

A graph pass (:class:`~fgq_tvm.relax_passes.LegalizeQuantizedLayers`) describes each quantized
layer's kernel by a :class:`KernelSpec` (the layer, its geometry, its core, the fused epilogue,
the layouts, whether it reads activation bytes), recorded in the kernel PrimFunc's ``fgq.*``
attributes so that later passes, tuning and benchmarks read it back (:meth:`KernelSpec.of`),
and passes the layer's constants in the order :func:`kernel_arguments` gives them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tvm

from ..quant.layers import ActQuant, QuantizedLayer
from .conv2d import pack_bitplanes, pack_trits, to_kernel_layout
from .core import NO_EPILOGUE, SCHEDULED, Conv2dShape, Epilogue, LayerKernels, WeightEncoding
from .layout import PLAIN, Layouts
from .select import core_named


def layer_encoding(layer: QuantizedLayer) -> WeightEncoding:
    """The kernel variant that computes ``layer``."""
    if not layer.is_ternary:
        return "int8"
    if layer.uses_group_scales:
        return "ternary_group_scales"
    return "ternary_asymmetric_int8_scales" if layer.asymmetric_scales else "ternary_int8_scales"


def kernel_arguments(layer: QuantizedLayer, core: str) -> list[np.ndarray]:
    """The constant arguments of the layer's kernel on the core named ``core``, after ``x``: the
    weights (ternary ones in the core's :attr:`~fgq_tvm.schedules.core.Core.ternary_storage`),
    the scales, the bias (:func:`~fgq_tvm.schedules.conv2d.layer_arguments` order)."""
    bias = layer.bias.astype(np.float32)
    encoding = layer_encoding(layer)
    if encoding == "int8":
        return [to_kernel_layout(layer.weight.astype(np.int8)), layer.out_scale(), bias]
    if core_named(core).ternary_storage == "base3":
        weights = [pack_trits(layer.weight, layer.group_size)]
    else:
        weights = list(pack_bitplanes(layer.weight, layer.group_size))
    if encoding == "ternary_group_scales":
        return [*weights, to_kernel_layout(layer.group_scale.astype(np.float32)), bias]
    scales = [layer.group_scale_q]
    if layer.asymmetric_scales:
        scales.append(layer.negative_scale_q)
    scales = [to_kernel_layout(scale.astype(np.int8)) for scale in scales]
    return [*weights, *scales, layer.out_scale(), bias]


@dataclass(frozen=True)
class KernelSpec:
    """What a quantized kernel PrimFunc computes, as its ``fgq.*`` attributes record it.

    Attributes
    ----------
    layer
        The layer (``fgq.layer``: its name).
    shape
        Its geometry (``fgq.input_shape``: the NCHW input shape).
    core
        ``fgq.core``.
    epilogue
        ``fgq.epilogue``: empty until :class:`~fgq_tvm.relax_passes.FuseLayerEpilogues`.
    layouts
        ``fgq.layout``: the layouts of the kernel's input and output (and residual).
    quantized_input
        ``fgq.input``: the input holds the layer's activation bytes (``uint8``, written by the
        previous kernel) instead of ``float32`` values; the epilogue's quantizer
        (``fgq.quantize``) says the same of the output.
    """

    layer: QuantizedLayer
    shape: Conv2dShape
    core: str
    epilogue: Epilogue = NO_EPILOGUE
    layouts: Layouts = PLAIN
    quantized_input: bool = False

    def kernels(self) -> LayerKernels:
        """The PrimFuncs with their default schedules."""
        encoding = layer_encoding(self.layer)
        return core_named(self.core).kernels(
            self.shape, self.layer.act, encoding, self.epilogue, self.layouts,
            self.quantized_input,
        )  # fmt: skip

    def workload(self) -> tvm.tirx.PrimFunc:
        """The unscheduled kernel on a tunable core
        (:meth:`~fgq_tvm.schedules.core.Core.workload`)."""
        return core_named(self.core).workload(
            self.shape, self.layer.act, layer_encoding(self.layer), self.epilogue, self.layouts,
            self.quantized_input,
        )  # fmt: skip

    @property
    def input_dtype(self) -> str:
        return "uint8" if self.quantized_input else "float32"

    def attributes(self, name: str) -> dict:
        """The kernel PrimFunc's attributes, ``name`` its ``global_symbol``."""
        shape = self.shape
        quantize = self.epilogue.quantize
        scheduled = {} if core_named(self.core).rule_scheduled else {SCHEDULED: True}
        return {
            "global_symbol": name,
            **scheduled,
            "fgq.layer": self.layer.name,
            "fgq.core": self.core,
            "fgq.input_shape": [shape.batch, shape.in_channels, shape.height, shape.width],
            "fgq.epilogue": self.epilogue.name,
            "fgq.quantize": quantize.name if quantize is not None else "",
            "fgq.layout": self.layouts.name,
            "fgq.input": self.input_dtype,
        }

    @staticmethod
    def of(func, layers: Mapping[str, QuantizedLayer]) -> KernelSpec | None:
        """The spec ``func``'s attributes record, or ``None`` if it is no quantized kernel."""
        attrs = func.attrs if func.attrs is not None else {}
        if "fgq.layer" not in attrs:
            return None
        layer = layers[str(attrs["fgq.layer"])]
        input_shape = tuple(int(d) for d in attrs["fgq.input_shape"])
        quantize = str(attrs["fgq.quantize"])
        quantizer = ActQuant.parse(quantize) if quantize else None
        return KernelSpec(
            layer,
            layer_shape(layer, input_shape),
            str(attrs["fgq.core"]),
            Epilogue.parse(str(attrs["fgq.epilogue"]), quantizer),
            Layouts.parse(str(attrs["fgq.layout"])),
            str(attrs["fgq.input"]) == "uint8",
        )


def layer_shape(layer: QuantizedLayer, input_shape: tuple[int, int, int, int]) -> Conv2dShape:
    """The kernel geometry of ``layer`` applied to an NCHW input of ``input_shape``."""
    batch, channels, height, width = input_shape
    k_out, _, k_h, k_w = layer.weight.shape
    return Conv2dShape(
        batch, channels, height, width, k_out, (k_h, k_w),
        layer.stride, layer.padding, layer.dilation, layer.group_size,
    )  # fmt: skip
