"""PromoteAveragesToFloat64: float32 averages computed in float64, rounded to float32 once.

Rewrites ``R.mean``, ``R.nn.adaptive_avg_pool2d`` and ``R.nn.avg_pool2d`` on float32 tensors::

    y = R.mean(x, axis)   ->   y = R.astype(R.mean(R.astype(x, "float64"), axis), "float32")

A float32 sum depends on its order, and PyTorch and TVM sum in different orders; when the
average feeds a quantized layer, a last-bit difference can move an activation across a rounding
boundary of the quantizer. Summed in float64 and rounded once, both agree except on exact ties.
The PyTorch reference averages the same way (``fgq_tvm.quant.quantize``).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ._mutation import mutate_relax_functions

AVERAGE_OPS = ("relax.mean", "relax.nn.adaptive_avg_pool2d", "relax.nn.avg_pool2d")


@tvm.transform.module_pass(opt_level=0, name="PromoteAveragesToFloat64")
class PromoteAveragesToFloat64:
    """Compute float32 averages in float64 (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return mutate_relax_functions(mod, _Rewriter(mod))


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.averages = [tvm.ir.Op.get(name) for name in AVERAGE_OPS]

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        is_average = any(call.op.same_as(op) for op in self.averages)
        if not is_average or call.args[0].ty.dtype != "float32":
            return call
        wide = self.builder_.emit(relax.op.astype(call.args[0], "float64"))
        average = self.builder_.emit(relax.Call(call.op, [wide, *call.args[1:]], call.attrs))
        return relax.op.astype(average, "float32")
