"""QuantizeKernelOutputs: Before/Expected modules compared structurally.

The modules are built with the BlockBuilder: the kernels are the real scheduled PrimFuncs of
:meth:`fgq_tvm.schedules.core.Core.kernels`, too long to spell out in TVMScript.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from helpers import kernel_call, ternary_conv_layer
from tvm import relax

from fgq_tvm.quant.layers import ActQuant
from fgq_tvm.relax_passes import QuantizeKernelOutputs
from fgq_tvm.schedules.core import Epilogue
from fgq_tvm.schedules.kernel_spec import KernelSpec, layer_shape
from fgq_tvm.schedules.layout import BLOCKED

DOT = "int8-dot-vnni"
FIRST, SECOND, THIRD = (replace(ternary_conv_layer(16, 16), name=name) for name in "abc")
OTHER_SCALE = replace(THIRD, name="d", act=replace(THIRD.act, scale=0.125))
LAYERS = {layer.name: layer for layer in (FIRST, SECOND, THIRD)} | {"d": OTHER_SCALE}
RELU = Epilogue(relu=True)
BLOCKED_TYPE = relax.TensorType((1, 1, 8, 8, 16), "float32")


def module(body) -> tvm.IRModule:
    """``main(x)`` (NCHW16c) whose dataflow block ``body(bb, x)`` emits; returns its output."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", BLOCKED_TYPE)
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x))
        bb.emit_func_output(out)
    return bb.finalize()


def dot(bb, layer, x, epilogue=None, **options):
    return kernel_call(bb, layer, x, DOT, epilogue, layouts=BLOCKED, **options)


def chain(bb, x):
    return dot(bb, THIRD, dot(bb, SECOND, dot(bb, FIRST, x, RELU), RELU), emit=False)


def chain_in_bytes(bb, x):
    """Each kernel quantizes its output for the next one, which reads the bytes."""
    first = dot(bb, FIRST, x, replace(RELU, quantize=SECOND.act), name="fgq_a_relu_quantized_out")
    second = dot(
        bb, SECOND, first, replace(RELU, quantize=THIRD.act), quantized_input=True,
        name="fgq_b_relu_quantized_in_quantized_out",
    )  # fmt: skip
    return dot(bb, THIRD, second, quantized_input=True, emit=False, name="fgq_c_quantized_in")


def two_readers(bb, x):
    first = dot(bb, FIRST, x, RELU)
    return relax.op.add(dot(bb, SECOND, first), dot(bb, THIRD, first))


def two_readers_in_bytes(bb, x):
    first = dot(bb, FIRST, x, replace(RELU, quantize=SECOND.act), name="fgq_a_relu_quantized_out")
    second = dot(bb, SECOND, first, quantized_input=True, name="fgq_b_quantized_in")
    third = dot(bb, THIRD, first, quantized_input=True, name="fgq_c_quantized_in")
    return relax.op.add(second, third)


def also_a_residual(bb, x):
    first = dot(bb, FIRST, x, RELU)
    return dot(bb, SECOND, first, Epilogue(residual=True), residual=first, emit=False)


def also_added(bb, x):
    first = dot(bb, FIRST, x, RELU)
    return relax.op.add(dot(bb, SECOND, first), first)


def readers_with_two_quantizers(bb, x):
    first = dot(bb, FIRST, x, RELU)
    return relax.op.add(dot(bb, SECOND, first), dot(bb, OTHER_SCALE, first))


@pytest.mark.parametrize(
    "before, after", [(chain, chain_in_bytes), (two_readers, two_readers_in_bytes)]
)
def test_kernels_pass_activation_bytes_to_their_only_readers(before, after):
    rewritten = QuantizeKernelOutputs(LAYERS)(module(before))
    tvm.ir.assert_structural_equal(rewritten, module(after))


@pytest.mark.parametrize("body", [also_a_residual, also_added, readers_with_two_quantizers])
def test_values_read_as_floats_or_by_two_quantizers_stay_float(body):
    before = module(body)
    tvm.ir.assert_structural_equal(QuantizeKernelOutputs(LAYERS)(before), before)


def test_kernel_attributes_record_the_bytes_in_and_out():
    shape = layer_shape(SECOND, (1, 16, 8, 8))
    epilogue = Epilogue(relu=True, quantize=ActQuant(0.1, 4, signed=True))
    spec = KernelSpec(SECOND, shape, DOT, epilogue, BLOCKED, quantized_input=True)
    func = spec.kernels().layer.with_attrs(spec.attributes("fgq_b"))
    assert KernelSpec.of(func, LAYERS) == spec
    assert func.params[0].ty.dtype == func.params[-1].ty.dtype == "uint8"


@pytest.mark.parametrize("act", [ActQuant(0.05, 8, False), ActQuant(0.3, 4, True)])
def test_activation_bytes_are_the_quantized_values_plus_the_offset(act):
    x = np.random.default_rng(0).normal(size=(2, 16, 5, 5)).astype(np.float32) * 5
    expected = act.quantize(torch.from_numpy(x)).numpy() + act.offset
    np.testing.assert_array_equal(act.stored(x), expected.astype(np.uint8))
    assert ActQuant.parse(act.name) == act
