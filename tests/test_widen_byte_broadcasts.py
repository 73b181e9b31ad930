"""WidenByteBroadcasts: 8-bit broadcasts of 8 and 16 lanes become broadcast 32-bit words, and
what nvcc then compiles."""

from __future__ import annotations

import shutil

import pytest
import tvm
from tvm.script import tirx as T

from fgq_tvm.cuda_binary import compiled_cuda_source
from fgq_tvm.schedules.cuda_pipeline import cuda_tir_pipeline
from fgq_tvm.schedules.widen_byte_broadcasts import WidenByteBroadcasts
from fgq_tvm.target import parse_target


def test_constant_and_variable_bytes_become_words():
    @T.prim_func(s_tir=True, private=True)
    def before(y: T.Buffer((32,), "uint8"), z: T.Buffer((8,), "int8"), v: T.uint8):
        y[0:16] = T.Broadcast(T.uint8(7), 16)
        y[16:32] = T.Broadcast(v, 16)
        z[0:8] = T.Broadcast(T.int8(-3), 8)

    @T.prim_func(s_tir=True, private=True)
    def expected(y: T.Buffer((32,), "uint8"), z: T.Buffer((8,), "int8"), v: T.uint8):
        y[0:16] = T.reinterpret("uint8x16", T.Broadcast(T.uint32(0x07070707), 4))
        y[16:32] = T.reinterpret(
            "uint8x16", T.Broadcast(T.Cast("uint32", T.Cast("uint8", v)) * T.uint32(0x01010101), 4)
        )
        z[0:8] = T.reinterpret("int8x8", T.Broadcast(T.uint32(0xFDFDFDFD), 2))

    after = WidenByteBroadcasts(tvm.IRModule({"main": before}))
    tvm.ir.assert_structural_equal(after["main"], expected)


def test_other_broadcasts_are_left_alone():
    @T.prim_func(s_tir=True, private=True)
    def before(y: T.Buffer((4,), "uint8"), f: T.Buffer((16,), "float32")):
        y[0:4] = T.Broadcast(T.uint8(7), 4)  # CUDA's codegen packs these itself
        f[0:16] = T.Broadcast(T.float32(1), 16)

    after = WidenByteBroadcasts(tvm.IRModule({"main": before}))
    tvm.ir.assert_structural_equal(after["main"], before)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_a_vectorized_byte_select_compiles_with_the_pipeline():
    @T.prim_func(s_tir=True)
    def select(x: T.Buffer((4, 64), "int8"), y: T.Buffer((4, 64), "int8")):
        for i in T.thread_binding(4, "blockIdx.x"):
            for t in T.thread_binding(4, "threadIdx.x"):
                for lane in T.vectorized(16):
                    y[i, t * 16 + lane] = T.if_then_else(i > 1, x[i, t * 16 + lane], T.int8(-3))

    cuda = parse_target("cuda -arch=sm_90")
    with cuda:
        built = tvm.compile(tvm.IRModule({"main": select}), cuda, tir_pipeline=cuda_tir_pipeline())
    source = built.mod.imports[0].inspect_source()
    assert "(uint)4261281277" in source  # 0xFDFDFDFD: the byte -3 four times in a word
    compiled_cuda_source(source, "sm_90")  # raises if nvcc rejects it
