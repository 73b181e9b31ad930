"""AsyncZeroFilledCopies: a pipeline's zero-padded global-to-shared copies become predicated
cp.async, and nothing else changes (what nvcc makes of it: test_tensor_core_gemm)."""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from fgq_tvm.schedules.async_zero_filled_copies import ASYNC_COPY, AsyncZeroFilledCopies


def _rewritten(func):
    return AsyncZeroFilledCopies(tvm.IRModule({"main": func}))["main"]


def test_a_zero_padded_copy_in_an_async_stage_becomes_a_predicated_cp_async():
    @T.prim_func(s_tir=True, private=True)
    def before(x: T.Buffer((64,), "uint8"), w: T.Buffer((64,), "int8"), c: T.bool):
        a = T.alloc_buffer((64,), "uint8", scope="shared")
        b = T.alloc_buffer((64,), "int8", scope="shared")
        with T.attr(0, "async_commit_queue_scope", 0):
            a[0:16] = T.if_then_else(c, x[T.Ramp(16, 1, 16)], T.Broadcast(T.uint8(0), 16))
            b[8:16] = T.if_then_else(c, w[T.Ramp(40, 1, 8)], T.Broadcast(T.int8(0), 8))
            # a buffer merged with others into one allocation, at offset 32
            a[T.Ramp(0, 1, 4) + T.Broadcast(32, 4)] = T.if_then_else(
                c, x[T.Ramp(8, 1, 4)], T.Broadcast(T.uint8(0), 4)
            )

    @T.prim_func(s_tir=True, private=True)
    def expected(x: T.Buffer((64,), "uint8"), w: T.Buffer((64,), "int8"), c: T.bool):
        a = T.alloc_buffer((64,), "uint8", scope="shared")
        b = T.alloc_buffer((64,), "int8", scope="shared")
        with T.attr(0, "async_commit_queue_scope", 0):
            T.evaluate(T.call_intrin("uint8", ASYNC_COPY, a.data, 0, x.data, 16, 16, c))
            T.evaluate(T.call_intrin("int8", ASYNC_COPY, b.data, 8, w.data, 40, 8, c))
            T.evaluate(T.call_intrin("uint8", ASYNC_COPY, a.data, 0 + 32, x.data, 8, 4, c))

    tvm.ir.assert_structural_equal(_rewritten(before), expected)


def test_copies_it_cannot_make_asynchronous_are_left_alone():
    @T.prim_func(s_tir=True, private=True)
    def before(x: T.Buffer((64,), "uint8"), c: T.bool):
        a = T.alloc_buffer((64,), "uint8", scope="shared")
        r = T.alloc_buffer((64,), "uint8", scope="local")
        with T.attr(0, "async_commit_queue_scope", 0):
            # padded with another byte: cp.async fills with zeros only
            a[0:16] = T.if_then_else(c, x[T.Ramp(0, 1, 16)], T.Broadcast(T.uint8(128), 16))
            # not consecutive bytes
            a[16:32] = T.if_then_else(c, x[T.Ramp(0, 2, 16)], T.Broadcast(T.uint8(0), 16))
            # 2 bytes: cp.async moves 4, 8 or 16
            a[32:34] = T.if_then_else(c, x[T.Ramp(0, 1, 2)], T.Broadcast(T.uint8(0), 2))
            # one condition per lane
            a[48:52] = T.if_then_else(
                T.Ramp(0, 1, 4) < T.Broadcast(2, 4), x[T.Ramp(0, 1, 4)], T.Broadcast(T.uint8(0), 4)
            )
            # into registers, not shared memory
            r[0:16] = T.if_then_else(c, x[T.Ramp(0, 1, 16)], T.Broadcast(T.uint8(0), 16))
        with T.attr(0, "async_wait_queue_scope", 0):  # not a stage whose copies are awaited
            a[0:16] = T.if_then_else(c, x[T.Ramp(0, 1, 16)], T.Broadcast(T.uint8(0), 16))

    tvm.ir.assert_structural_equal(_rewritten(before), before)
