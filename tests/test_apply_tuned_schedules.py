"""ApplyTunedSchedules: Before/Expected modules compared structurally."""

from __future__ import annotations

import tvm
from helpers import kernel_call, ternary_conv_layer
from tvm import relax

from fgq_tvm.relax_passes import ApplyTunedSchedules
from fgq_tvm.schedules.conv2d_dot import DotSchedule, dot_conv2d_prim_func
from fgq_tvm.schedules.core import Conv2dShape

CONV = ternary_conv_layer(16, 8)
SHAPE = Conv2dShape(1, 8, 6, 6, 16, (3, 3), padding=(1, 1), group_size=4)
TUNED = dot_conv2d_prim_func(SHAPE, CONV.act, "ternary_group_scales", DotSchedule(2))


def module() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(kernel_call(bb, CONV, x, core="int8-dot-vnni"))
        bb.emit_func_output(out)
    return bb.finalize()


def expected(kernel: tvm.tirx.PrimFunc, schedule: str) -> tvm.IRModule:
    """The module with ``kernel`` in place of the layer's, tagged with ``schedule``."""
    mod = module()
    attrs = {**mod["fgq_conv"].attrs, "fgq.schedule": schedule}
    mod["fgq_conv"] = kernel.with_attrs(attrs)
    return mod


def test_tuned_kernel_replaces_the_default():
    after = ApplyTunedSchedules(lambda func: TUNED)(module())
    tvm.ir.assert_structural_equal(after, expected(TUNED, "tuned"))


def test_kernel_without_tuned_schedule_keeps_the_default():
    before = module()
    after = ApplyTunedSchedules(lambda func: None)(before)
    tvm.ir.assert_structural_equal(after, expected(before["fgq_conv"], "default"))
