"""BlockKernelOutputs: a kernel whose output is converted to NCHW16c writes NCHW16c itself.

ConvertLayout keeps a conv whose input channels are no whole block of 16 (the stem conv on an
RGB image) in NCHW, and converts its output to NCHW16c where the blocked part of the network
begins, after a max pooling if there is one. This pass rewrites, where ``fgq_conv`` is a
quantized kernel reading and writing NCHW, without a residual, and each intermediate value has
no other use::

    y = R.call_tir(fgq_conv, (x, ...))            y = R.call_tir(fgq_conv_blocked, (x, ...))
    p = R.nn.max_pool2d(y, layout="NCHW")   ->    z = R.nn.max_pool2d(y, layout="NCHW16c",
    z = R.layout_transform(p, NCHW->NCHW16c)                          out_layout="NCHW16c")

(and without the pooling: ``z = R.call_tir(fgq_conv_blocked, ...)``). ``fgq_conv_blocked`` is
the layer's kernel with :class:`~fgq_tvm.schedules.layout.Layouts` NCHW in, NCHW16c out, on a
core that computes in them: it stores its output tile as whole vectors, the pooling works on
whole vectors, and no layout transform runs. The values are unchanged (a layout is only an
order; max pooling compares the same elements).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quant.layers import QuantizedLayer
from ..schedules.kernel_spec import KernelSpec
from ..schedules.layout import CHANNEL_BLOCK, NCHW, NCHW16C, PLAIN, Layouts, index_map
from ..schedules.select import core_named
from ._mutation import mutate_relax_functions, variable_uses, without_unused_kernels

STEM_LAYOUTS = Layouts(NCHW, NCHW16C)


@tvm.transform.module_pass(opt_level=0, name="BlockKernelOutputs")
class BlockKernelOutputs:
    """Let kernels write NCHW16c where their output is converted to it (see the module
    docstring).

    Parameters
    ----------
    layers
        The quantized layers by name (the kernels' ``fgq.layer`` attribute).
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer]):
        self.layers = dict(layers)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mod = mutate_relax_functions(mod, _Rewriter(mod, self.layers))
        return without_unused_kernels(relax.transform.DeadCodeElimination()(mod))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, layers: Mapping[str, QuantizedLayer]):
        super().__init__(mod)
        self.layers = layers
        self.transform = tvm.ir.Op.get("relax.layout_transform")
        self.max_pool = tvm.ir.Op.get("relax.nn.max_pool2d")
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.to_blocked = [
            tvm.tirx.IndexMap.from_func(index_map(NCHW, NCHW16C), index_dtype=dtype)
            for dtype in ("int32", "int64")
        ]
        self.uses = {}

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        self.uses = variable_uses(func)
        return super().visit_function_(func)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not self._is_blocking_transform(call):
            return call
        source = self._single_use_binding(call.args[0])
        if self._is(source, self.max_pool) and source.attrs.layout == NCHW:
            kernel = self._blocked_kernel(self._single_use_binding(source.args[0]))
            if kernel is not None:
                return _blocked_max_pool(self.builder_.emit(kernel), source.attrs)
            return call
        kernel = self._blocked_kernel(source)
        return call if kernel is None else kernel

    def _is_blocking_transform(self, call: relax.Call) -> bool:
        if not self._is(call, self.transform) or call.attrs.pad_value is not None:
            return False
        return any(
            tvm_ffi.structural_equal(call.attrs.index_map, blocking, map_free_vars=True)
            for blocking in self.to_blocked
        )

    def _single_use_binding(self, expr: relax.Expr):
        if not isinstance(expr, relax.Var) or self.uses[expr] != 1:
            return None
        return self.lookup_binding(expr)

    def _blocked_kernel(self, call) -> relax.Call | None:
        """The quantized kernel call ``call`` writing NCHW16c, or ``None`` if it cannot."""
        if not self._is(call, self.call_tir):
            return None
        kernel_var = call.args[0]
        kernel = self.builder_.get()[kernel_var]
        spec = KernelSpec.of(kernel, self.layers)
        if spec is None or spec.layouts != PLAIN or spec.epilogue.residual:
            return None
        whole_blocks = spec.shape.out_channels % CHANNEL_BLOCK == 0
        if not whole_blocks or core_named(spec.core).layouts_for(STEM_LAYOUTS) != STEM_LAYOUTS:
            return None
        blocked = replace(spec, layouts=STEM_LAYOUTS)
        kernels = blocked.kernels()
        name = f"{kernel_var.name_hint}_blocked"
        func = kernels.layer.with_attrs({**kernel.attrs, **blocked.attributes(name)})
        new_var = self.builder_.add_func(func, name)
        return relax.call_tir(new_var, call.args[1], relax.TensorType(*kernels.output))

    @staticmethod
    def _is(expr, op) -> bool:
        return isinstance(expr, relax.Call) and expr.op.same_as(op)


def _blocked_max_pool(data: relax.Expr, attrs) -> relax.Expr:
    return relax.op.nn.max_pool2d(
        data,
        pool_size=attrs.pool_size,
        strides=attrs.strides,
        padding=attrs.padding,
        dilation=attrs.dilation,
        ceil_mode=attrs.ceil_mode,
        count_include_pad=attrs.count_include_pad,
        layout=NCHW16C,
        out_layout=NCHW16C,
    )
