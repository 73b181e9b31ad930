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

The weight parameters the pass rewrote are no longer used; binding the remaining parameters and
running dead code elimination removes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quant.layers import QuantizedLayer
from ..schedules.conv2d import Conv2dShape, WeightEncoding, pack_bitplanes, to_kernel_layout
from ..schedules.select import LayerKernels, layer_kernels, select_core
from ._mutation import mutate_relax_functions


def layer_encoding(layer: QuantizedLayer) -> WeightEncoding:
    """The kernel variant that computes ``layer``."""
    if not layer.is_ternary:
        return "int8"
    return "ternary_group_scales" if layer.uses_group_scales else "ternary_int8_scales"


def kernel_arguments(layer: QuantizedLayer) -> list[np.ndarray]:
    """The constant arguments of the layer's kernel, in ``conv2d_compute`` order (after x)."""
    bias = layer.bias.astype(np.float32)
    encoding = layer_encoding(layer)
    if encoding == "int8":
        return [to_kernel_layout(layer.weight.astype(np.int8)), layer.out_scale(), bias]
    plus, minus = pack_bitplanes(layer.weight, layer.group_size)
    if encoding == "ternary_group_scales":
        return [plus, minus, to_kernel_layout(layer.group_scale.astype(np.float32)), bias]
    alpha_q = to_kernel_layout(layer.group_scale_q.astype(np.int8))
    return [plus, minus, alpha_q, layer.out_scale(), bias]


def kernel_attributes(name: str, layer: QuantizedLayer, shape: Conv2dShape, core: str) -> dict:
    """What a kernel PrimFunc records about itself: the layer it computes (``fgq.layer``), on
    which core, for which NCHW input shape, and its epilogue (none yet: ``fgq.epilogue`` is
    empty until :class:`~fgq_tvm.relax_passes.FuseLayerEpilogues`)."""
    input_shape = [shape.batch, shape.in_channels, shape.height, shape.width]
    return {
        "global_symbol": name,
        "fgq.layer": layer.name,
        "fgq.core": core,
        "fgq.input_shape": input_shape,
        "fgq.epilogue": "",
    }


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

    Each kernel PrimFunc carries the attributes of :func:`kernel_attributes`.
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
                return self._conv2d(call.args[0], layer)
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

    def _conv2d(self, x: relax.Expr, layer: QuantizedLayer) -> relax.Expr:
        shape = layer_shape(layer, _static_shape(x))
        encoding = layer_encoding(layer)
        core = select_core(shape, layer.act, encoding, self.target)
        kernels = layer_kernels(core, shape, layer.act, encoding)
        name = "fgq_" + layer.name.replace(".", "_")
        stored = [relax.const(array) for array in kernel_arguments(layer)]
        prepared = self._pack(kernels, stored[: kernels.packed_arguments], name + "_pack")
        attrs = kernel_attributes(name, layer, shape, core)
        kernel = self.builder_.add_func(kernels.layer.with_attrs(attrs), name)
        args = [x, *prepared, *stored[kernels.packed_arguments :]]
        return relax.call_tir(kernel, args, _tensor_type(kernels.output))

    def _pack(self, kernels: LayerKernels, stored: list[relax.Expr], name: str) -> list:
        """The pack's outputs (bound to variables), or nothing for cores without one."""
        if kernels.pack is None:
            return []
        pack = self.builder_.add_func(kernels.pack.with_attrs({"global_symbol": name}), name)
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


def _tensor_type(spec: tuple[tuple[int, ...], str]) -> relax.TensorType:
    return relax.TensorType(*spec)


def _static_shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(dim) for dim in expr.ty.shape)
