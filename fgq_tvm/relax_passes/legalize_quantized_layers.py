"""LegalizeQuantizedLayers: conv2d and linear carrying FGQ parameters become quantized kernels.

Rewrites, for every weight parameter named in the given table of
:class:`~fgq_tvm.quant.layers.QuantizedLayer`:

* ``R.nn.conv2d(x, w)`` into ``R.call_tir(fgq_<layer>, (x, *packed))``;
* ``R.matmul(x, R.permute_dims(w))`` (how the PyTorch importer writes ``nn.Linear``) into
  ``R.reshape(R.call_tir(fgq_<layer>, (R.reshape(x, [B, C, 1, 1]), *packed)), [B, K])``
  (``[B, 1, 1, C]`` where the network is NHWC).

``fgq_<layer>`` is the layer's scheduled PrimFunc on the core
:func:`~fgq_tvm.schedules.select.select_core` picks (the fastest measured, where a tuning
database measured several): it quantizes the float input
(``clamp(round(x / s_x))``), runs the ternary-group (or 8-bit) core and returns the dequantized
float output with the layer's bias added, so the layer's bias must not also stay in the graph
(the exporter strips it). ``packed`` are the stored arguments as constants (the 2-bit ternary
bitplanes and the group scales, or the int8 weights, and the bias); for cores that want the
weights in another layout, the leading ones first go through
``R.call_tir(fgq_<layer>_pack, (...))``, a computation on constants only that
:class:`~fgq_tvm.relax_passes.LiftConstantComputations` moves to load time.

A conv2d in the blocked layout ``NCHW16c`` or in ``NHWC`` (as ``R.transform.ConvertLayout``
leaves it, see :mod:`~fgq_tvm.schedules.layout`) keeps it: its kernel reads and writes that
layout where the core computes in it, and otherwise sits between two ``R.layout_transform`` to
and from the layout the core computes in.

The weight parameters the pass rewrote are no longer used; binding the remaining parameters and
running dead code elimination removes them.
"""

from __future__ import annotations

from collections.abc import Mapping

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quant.layers import QuantizedLayer
from ..schedules.core import SCHEDULED, LayerKernels
from ..schedules.kernel_spec import (
    KernelSpec,
    kernel_arguments,
    layer_encoding,
    layer_shape,
)
from ..schedules.layout import (
    NCHW,
    NCHW16C,
    NHWC,
    ActivationLayout,
    Layouts,
    activation_dims,
    index_map,
    nchw_shape,
)
from ..schedules.select import core_named, network_layout, select_core
from ._mutation import mutate_relax_functions


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
    core_choices
        The fastest core measured for a layer, by
        :func:`~fgq_tvm.schedules.select.layer_key` (:mod:`fgq_tvm.core_choices`): it computes
        the layer where it can take the place of the first core.

    Each kernel PrimFunc carries the attributes of :class:`KernelSpec`.
    """

    def __init__(
        self,
        layers: Mapping[str, QuantizedLayer],
        target=None,
        core_choices: Mapping[str, str] | None = None,
    ):
        self.layers = dict(layers)
        self.target = target
        self.core_choices = dict(core_choices or {})

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        rewriter = _Rewriter(mod, self.layers, self.target, self.core_choices)
        return mutate_relax_functions(mod, rewriter)


@mutator
class _Rewriter(PyExprMutator):
    def __init__(
        self,
        mod: tvm.IRModule,
        layers: Mapping[str, QuantizedLayer],
        target,
        core_choices: Mapping[str, str],
    ):
        super().__init__(mod)
        self.layers = layers
        self.target = target
        self.core_choices = core_choices
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
        encoding = layer_encoding(layer)
        core = select_core(shape, layer.act, encoding, self.target, measured=self.core_choices)
        layouts = core_named(core).layouts_for(Layouts(layout, layout))
        spec = KernelSpec(layer, shape, core, layouts=layouts)
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
        scheduled = {} if core_named(kernels.core).rule_scheduled else {SCHEDULED: True}
        attrs = {"global_symbol": name, **scheduled}
        pack = self.builder_.add_func(kernels.pack.with_attrs(attrs), name)
        types = [_tensor_type(spec) for spec in kernels.prepared]
        packed = self.builder_.emit(
            relax.call_tir(pack, stored, types[0] if len(types) == 1 else types)
        )
        if len(types) == 1:
            return [packed]
        return [self.builder_.emit(relax.TupleGetItem(packed, i)) for i in range(len(types))]

    def _linear(self, x: relax.Expr, layer: QuantizedLayer) -> relax.Expr:
        """A 1x1 conv on a 1x1 image, given in NHWC where the network keeps it (the same
        array as in NCHW), else in NCHW."""
        batch, features = _static_shape(x)
        layout = NHWC if network_layout(self.target) == NHWC else NCHW
        image = activation_dims(layout, batch, features, 1, 1)
        as_image = self.builder_.emit(relax.op.reshape(x, image))
        out = self.builder_.emit(self._conv2d(as_image, layer, layout))
        return relax.op.reshape(out, (batch, layer.weight.shape[0]))


def _activation_layout(conv2d: relax.Call) -> ActivationLayout:
    """The activation layout of a conv2d call: NCHW, or NCHW16c or NHWC as ConvertLayout
    writes it."""
    data, out = str(conv2d.attrs.data_layout), str(conv2d.attrs.out_layout)
    if data != out or data not in (NCHW, NCHW16C, NHWC):
        raise ValueError(f"quantized conv2d in layout {data} -> {out}: only NCHW, NCHW16c or NHWC")
    return data


def _tensor_type(spec: tuple[tuple[int, ...], str]) -> relax.TensorType:
    return relax.TensorType(*spec)


def _static_shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(dim) for dim in expr.ty.shape)
