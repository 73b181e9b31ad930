"""LegalizeQuantizedLayers: conv2d and linear carrying FGQ parameters become quantized kernels.

Rewrites, for every weight parameter named in the given table of
:class:`~fgq_tvm.quant.layers.QuantizedLayer`:

* ``R.nn.conv2d(x, w)`` into ``R.call_tir(fgq_<layer>, (x, *packed))``;
* ``R.matmul(x, R.permute_dims(w))`` (how the PyTorch importer writes ``nn.Linear``) into
  ``R.reshape(R.call_tir(fgq_<layer>, (R.reshape(x, [B, C, 1, 1]), *packed)), [B, K])``.

``fgq_<layer>`` is the layer's scheduled PrimFunc on the core
:func:`~fgq_tvm.schedules.select.select_core` picks: it quantizes the float input
(``clamp(round(x / s_x))``), runs the ternary-group (or 8-bit) core and returns the dequantized
float output with the layer's bias added, so the layer's bias must not also stay in the graph
(the exporter strips it). ``packed`` are the stored arguments as constants (the 2-bit ternary
bitplanes and the group scales, or the int8 weights, and the bias); for cores that want the
weights in another layout, the leading ones first go through
``R.call_tir(fgq_<layer>_pack, (...))``, a computation on constants only that
:class:`~fgq_tvm.relax_passes.LiftConstantComputations` moves to load time.

A conv2d in the blocked layout ``NCHW16c`` (as ``R.transform.ConvertLayout`` leaves it, see
:mod:`~fgq_tvm.schedules.layout`) keeps it: its kernel reads and writes NCHW16c where the core
computes in it, and otherwise sits between two ``R.layout_transform`` to and from NCHW.

The weight parameters the pass rewrote are no longer used; binding the remaining parameters and
running dead code elimination removes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quant.layers import ActQuant, QuantizedLayer
from ..schedules.conv2d import (
    NO_EPILOGUE,
    Conv2dShape,
    Epilogue,
    WeightEncoding,
    pack_bitplanes,
    pack_trits,
    to_kernel_layout,
)
from ..schedules.layout import (
    NCHW,
    NCHW16C,
    PLAIN,
    ActivationLayout,
    Layouts,
    index_map,
    nchw_shape,
)
from ..schedules.select import (
    Core,
    LayerKernels,
    kernel_layouts,
    layer_kernels,
    select_core,
    ternary_storage,
)
from ._mutation import mutate_relax_functions
from .schedule_graph_operators import SCHEDULED  # kernels and packs come scheduled


def layer_encoding(layer: QuantizedLayer) -> WeightEncoding:
    """The kernel variant that computes ``layer``."""
    if not layer.is_ternary:
        return "int8"
    if layer.uses_group_scales:
        return "ternary_group_scales"
    return "ternary_asymmetric_int8_scales" if layer.asymmetric_scales else "ternary_int8_scales"


def kernel_arguments(layer: QuantizedLayer, core: Core) -> list[np.ndarray]:
    """The constant arguments of the layer's kernel on ``core``, after ``x``: the weights
    (ternary ones in the core's :func:`~fgq_tvm.schedules.select.ternary_storage`), the
    scales, the bias (:func:`~fgq_tvm.schedules.conv2d.layer_arguments` order)."""
    bias = layer.bias.astype(np.float32)
    encoding = layer_encoding(layer)
    if encoding == "int8":
        return [to_kernel_layout(layer.weight.astype(np.int8)), layer.out_scale(), bias]
    if ternary_storage(core) == "base3":
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
    core: Core
    epilogue: Epilogue = NO_EPILOGUE
    layouts: Layouts = PLAIN
    quantized_input: bool = False

    def kernels(self) -> LayerKernels:
        """The PrimFuncs with their default schedules."""
        encoding = layer_encoding(self.layer)
        return layer_kernels(
            self.core, self.shape, self.layer.act, encoding, self.epilogue, self.layouts,
            self.quantized_input,
        )  # fmt: skip

    @property
    def input_dtype(self) -> str:
        return "uint8" if self.quantized_input else "float32"

    def attributes(self, name: str) -> dict:
        """The kernel PrimFunc's attributes, ``name`` its ``global_symbol``."""
        shape = self.shape
        quantize = self.epilogue.quantize
        return {
            "global_symbol": name,
            SCHEDULED: True,
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


@tvm.transform.module_pass(opt_level=0, name="LegalizeQuantizedLayers")
class LegalizeQuantizedLayers:
    """Rewrite conv2d/linear on the named weight parameters into quantized kernels.

    Parameters
    ----------
    layers
        Quantized layers keyed by the name of their weight parameter in the Relax function
        (``p_layer1_0_conv1_weight`` for ``layer1.0.conv1`` as imported from torch.export).
    target
        The :class:`tvm.target.Target` whose features pick each layer's core
        (:func:`~fgq_tvm.schedules.select.select_core`); ``None`` for the portable core.

    Each kernel PrimFunc carries the attributes of :class:`KernelSpec`.
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer], target=None):
        self.layers = dict(layers)
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return mutate_relax_functions(mod, _Rewriter(mod, self.layers, self.target))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, layers: Mapping[str, QuantizedLayer], target):
        super().__init__(mod)
        self.layers = layers
        self.target = target
        self.conv2d_op = tvm.ir.Op.get("relax.nn.conv2d")
        self.matmul_op = tvm.ir.Op.get("relax.matmul")
        self.permute_op = tvm.ir.Op.get("relax.permute_dims")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op.same_as(self.conv2d_op):
            layer = self._layer_of(call.args[1])
            if layer is not None:
                return self._conv2d(call.args[0], layer, _activation_layout(call))
        elif call.op.same_as(self.matmul_op):
            weight = self._transposed_weight(call.args[1])
            layer = self._layer_of(weight) if weight is not None else None
            if layer is not None:
                return self._linear(call.args[0], layer)
        return call

    def _layer_of(self, expr: relax.Expr) -> QuantizedLayer | None:
        if isinstance(expr, relax.Var):
            return self.layers.get(expr.name)
        return None

    def _transposed_weight(self, expr: relax.Expr) -> relax.Expr | None:
        bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(bound, relax.Call) and bound.op.same_as(self.permute_op):
            return bound.args[0]
        return None

    def _conv2d(self, x: relax.Expr, layer: QuantizedLayer, layout: ActivationLayout = NCHW):
        shape = layer_shape(layer, nchw_shape(_static_shape(x), layout))
        core = select_core(shape, layer.act, layer_encoding(layer), self.target)
        spec = KernelSpec(layer, shape, core, layouts=kernel_layouts(core, Layouts(layout, layout)))
        kernels = spec.kernels()
        name = "fgq_" + layer.name.replace(".", "_")
        stored = [relax.const(array) for array in kernel_arguments(layer, core)]
        prepared = self._pack(kernels, stored[: kernels.packed_arguments], name + "_pack")
        kernel = self.builder_.add_func(kernels.layer.with_attrs(spec.attributes(name)), name)
        computed = spec.layouts.input
        if computed != layout:
            x = self.builder_.emit(relax.op.layout_transform(x, index_map(layout, computed)))
        args = [x, *prepared, *stored[kernels.packed_arguments :]]
        call = relax.call_tir(kernel, args, _tensor_type(kernels.output))
        if computed != layout:
            y = self.builder_.emit(call)
            return relax.op.layout_transform(y, index_map(computed, layout))
        return call

    def _pack(self, kernels: LayerKernels, stored: list[relax.Expr], name: str) -> list:
        """The pack's outputs (bound to variables), or nothing for cores without one."""
        if kernels.pack is None:
            return []
        attrs = {"global_symbol": name, SCHEDULED: True}
        pack = self.builder_.add_func(kernels.pack.with_attrs(attrs), name)
        types = [_tensor_type(spec) for spec in kernels.prepared]
        packed = self.builder_.emit(
            relax.call_tir(pack, stored, types[0] if len(types) == 1 else types)
        )
        if len(types) == 1:
            return [packed]
        return [self.builder_.emit(relax.TupleGetItem(packed, i)) for i in range(len(types))]

    def _linear(self, x: relax.Expr, layer: QuantizedLayer) -> relax.Expr:
        batch, features = _static_shape(x)
        as_image = self.builder_.emit(relax.op.reshape(x, (batch, features, 1, 1)))
        out = self.builder_.emit(self._conv2d(as_image, layer))
        return relax.op.reshape(out, (batch, layer.weight.shape[0]))


def _activation_layout(conv2d: relax.Call) -> ActivationLayout:
    """The activation layout of a conv2d call: NCHW, or NCHW16c as ConvertLayout writes it."""
    data, out = str(conv2d.attrs.data_layout), str(conv2d.attrs.out_layout)
    if data != out or data not in (NCHW, NCHW16C):
        raise ValueError(f"quantized conv2d in layout {data} -> {out}: only NCHW or NCHW16c")
    return data


def _tensor_type(spec: tuple[tuple[int, ...], str]) -> relax.TensorType:
    return relax.TensorType(*spec)


def _static_shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(dim) for dim in expr.ty.shape)
