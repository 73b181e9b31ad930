"""FuseLayerEpilogues: Before/Expected modules compared structurally.

The modules are built with the BlockBuilder: the kernels are the real scheduled PrimFuncs of
:meth:`fgq_tvm.schedules.core.Core.kernels`, too long to spell out in TVMScript.
"""

from __future__ import annotations

import pytest
import tvm
from helpers import kernel_call, ternary_conv_layer
from tvm import relax

from fgq_tvm.relax_passes import FuseLayerEpilogues
from fgq_tvm.schedules.core import Epilogue

CONV = ternary_conv_layer(8, 8)
IMAGE = relax.TensorType((1, 8, 6, 6), "float32")


def module(body) -> tvm.IRModule:
    """``main(x, r)`` whose dataflow block ``body(bb, x, r)`` emits; returns its output."""
    bb = relax.BlockBuilder()
    x, r = relax.Var("x", IMAGE), relax.Var("r", IMAGE)
    with bb.function("main", [x, r]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x, r))
        bb.emit_func_output(out)
    return bb.finalize()


def conv_add_relu(bb, x, r):
    return relax.op.nn.relu(bb.emit(relax.op.add(kernel_call(bb, CONV, x), r)))


def residual_first_add(bb, x, r):
    return relax.op.add(r, kernel_call(bb, CONV, x))


def conv_relu(bb, x, r):
    return relax.op.add(relax.op.nn.relu(kernel_call(bb, CONV, x)), r)


def conv_used_twice(bb, x, r):
    conv = kernel_call(bb, CONV, x)
    return relax.op.add(bb.emit(relax.op.nn.relu(conv)), conv)


def expected(epilogue: Epilogue, then=None) -> tvm.IRModule:
    """``main`` calls the fused kernel (then ``then(out, r)``); the plain kernel is gone."""

    def body(bb, x, r):
        residual = r if epilogue.residual else None
        out = kernel_call(bb, CONV, x, epilogue=epilogue, residual=residual, emit=then is not None)
        return then(out, r) if then is not None else out

    return module(body)


@pytest.mark.parametrize(
    "body, epilogue, then",
    [
        (conv_add_relu, Epilogue(residual=True, relu=True), None),
        (residual_first_add, Epilogue(residual=True), None),
        (conv_relu, Epilogue(relu=True), relax.op.add),
    ],
)
def test_add_and_relu_join_the_kernel(body, epilogue, then):
    before = module(body)
    after = FuseLayerEpilogues({"conv": CONV})(before)
    tvm.ir.assert_structural_equal(after, expected(epilogue, then))


def test_output_with_other_uses_is_not_fused():
    before = module(conv_used_twice)
    tvm.ir.assert_structural_equal(FuseLayerEpilogues({"conv": CONV})(before), before)
