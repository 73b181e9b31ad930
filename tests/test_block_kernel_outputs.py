"""BlockKernelOutputs: Before/Expected modules compared structurally.

The modules are built with the BlockBuilder: the kernels are the real scheduled PrimFuncs of
:meth:`fgq_tvm.schedules.core.Core.kernels`, too long to spell out in TVMScript.
"""

from __future__ import annotations

import pytest
import tvm
from helpers import kernel_call, ternary_conv_layer
from tvm import relax

from fgq_tvm.relax_passes import BlockKernelOutputs
from fgq_tvm.relax_passes.block_kernel_outputs import STEM_LAYOUTS
from fgq_tvm.schedules.core import Epilogue
from fgq_tvm.schedules.layout import NCHW, NCHW16C, index_map

STEM = ternary_conv_layer(16, 3)
LAYERS = {"conv": STEM}
DOT = "int8-dot-vnni"
RELU = Epilogue(relu=True)
OUTPUT = relax.TensorType((1, 16, 8, 8), "float32")


def module(body) -> tvm.IRModule:
    """``main(x, r)`` whose dataflow block ``body(bb, x, r)`` emits; returns its output."""
    bb = relax.BlockBuilder()
    x, r = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32")), relax.Var("r", OUTPUT)
    with bb.function("main", [x, r]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x, r))
        bb.emit_func_output(out)
    return bb.finalize()


def to_blocked(value):
    return relax.op.layout_transform(value, index_map(NCHW, NCHW16C))


def max_pool(value, layout=NCHW):
    return relax.op.nn.max_pool2d(value, 3, 2, 1, layout=layout, out_layout=layout)


def stem_pool(bb, x, r):
    return to_blocked(bb.emit(max_pool(kernel_call(bb, STEM, x, DOT, RELU))))


def stem(bb, x, r):
    return to_blocked(kernel_call(bb, STEM, x, DOT, RELU))


def stem_with_residual(bb, x, r):
    add = Epilogue(residual=True)
    return to_blocked(kernel_call(bb, STEM, x, DOT, add, residual=r))


def stem_used_twice(bb, x, r):
    conv = kernel_call(bb, STEM, x, DOT, RELU)
    pooled = bb.emit(max_pool(conv))
    return relax.op.add(bb.emit(to_blocked(pooled)), bb.emit(to_blocked(bb.emit(max_pool(conv)))))


def expected(with_pool: bool) -> tvm.IRModule:
    """The stem kernel writes NCHW16c (and the pooling works in it); no transform is left."""

    def body(bb, x, r):
        conv = kernel_call(
            bb, STEM, x, DOT, RELU, emit=with_pool, layouts=STEM_LAYOUTS,
            name="fgq_conv_relu_blocked",
        )  # fmt: skip
        return max_pool(conv, NCHW16C) if with_pool else conv

    return module(body)


@pytest.mark.parametrize("body, with_pool", [(stem_pool, True), (stem, False)])
def test_kernel_writes_the_blocked_layout_itself(body, with_pool):
    after = BlockKernelOutputs(LAYERS)(module(body))
    tvm.ir.assert_structural_equal(after, expected(with_pool))


@pytest.mark.parametrize("body", [stem_with_residual, stem_used_twice])
def test_kernels_with_a_residual_or_other_uses_keep_their_layout(body):
    before = module(body)
    tvm.ir.assert_structural_equal(BlockKernelOutputs(LAYERS)(before), before)
