"""ScheduleGraphOperators: Before/Expected modules compared structurally."""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from fgq_tvm.relax_passes import ScheduleGraphOperators


@I.ir_module
class Before:
    @T.prim_func(s_tir=True)
    def relu(x: T.Buffer((128, 32), "float32"), y: T.Buffer((128, 32), "float32")):
        for i, j in T.grid(128, 32):
            with T.sblock("y"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = T.max(x[vi, vj], T.float32(0))

    @T.prim_func(s_tir=True)
    def window_max(x: T.Buffer((256, 8, 16), "float32"), y: T.Buffer((256, 16), "float32")):
        for i, j, k in T.grid(256, 16, 8):
            with T.sblock("y"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                with T.init():
                    y[vi, vj] = T.float32(-3.0e38)
                y[vi, vj] = T.max(y[vi, vj], x[vi, vk, vj])

    @T.prim_func(s_tir=True)
    def small(x: T.Buffer((16, 16), "float32"), y: T.Buffer((16, 16), "float32")):
        for i, j in T.grid(16, 16):
            with T.sblock("y"):
                vi, vj = T.axis.remap("SS", [i, j])
                y[vi, vj] = x[vi, vj] + T.float32(1)


@I.ir_module
class Expected:
    @T.prim_func(s_tir=True)
    def relu(x: T.Buffer((128, 32), "float32"), y: T.Buffer((128, 32), "float32")):
        T.func_attr({"tirx.is_scheduled": True})
        for ax0_fused in T.parallel(128):
            for ax1 in T.vectorized(32):
                with T.sblock("y"):
                    v0, v1 = T.axis.remap("SS", [ax0_fused, ax1])
                    y[v0, v1] = T.max(x[v0, v1], T.float32(0))

    @T.prim_func(s_tir=True)
    def window_max(x: T.Buffer((256, 8, 16), "float32"), y: T.Buffer((256, 16), "float32")):
        T.func_attr({"tirx.is_scheduled": True})
        for ax0_fused in T.parallel(256):
            for ax1_init in T.vectorized(16):
                with T.sblock("y_init"):
                    v0, v1 = T.axis.remap("SS", [ax0_fused, ax1_init])
                    y[v0, v1] = T.float32(-3.0e38)
            for ax2 in range(8):
                for ax1 in T.vectorized(16):
                    with T.sblock("y_update"):
                        v0, v1, v2 = T.axis.remap("SSR", [ax0_fused, ax1, ax2])
                        y[v0, v1] = T.max(y[v0, v1], x[v0, v2, v1])

    @T.prim_func(s_tir=True)
    def small(x: T.Buffer((16, 16), "float32"), y: T.Buffer((16, 16), "float32")):
        T.func_attr({"tirx.is_scheduled": True})
        for ax0, ax1 in T.grid(16, 16):
            with T.sblock("y"):
                v0, v1 = T.axis.remap("SS", [ax0, ax1])
                y[v0, v1] = x[v0, v1] + T.float32(1)


def test_outer_loops_run_in_parallel_and_short_inner_loops_as_vectors():
    """Elementwise: outer loops parallel, the inner loop one vector; a reduction: its window
    loop outside a vector of outputs; below the size threshold: serial."""
    tvm.ir.assert_structural_equal(ScheduleGraphOperators()(Before), Expected)


def test_scheduled_functions_are_left_alone():
    scheduled = tvm.IRModule({"relu": Before["relu"].with_attr("tirx.is_scheduled", True)})
    tvm.ir.assert_structural_equal(ScheduleGraphOperators()(scheduled), scheduled)
