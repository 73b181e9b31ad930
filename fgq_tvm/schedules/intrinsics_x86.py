"""The project's own x86 dot-product tensor intrinsics.

The wheel's ``dot_16x4_vnni`` passes ``<16 x i32>`` operands to ``llvm.x86.avx512.vpdpbusd.512``,
whose signature in the LLVM inside the wheel takes ``<64 x i8>`` multiplicands, so everything
tensorized with it dies in LLVM's verifier (DESIGN.md). This one reinterprets the broadcast
activation word and the weight tile as ``int8x64``: one ``vpdpbusd`` adds, for each of 16 output
lanes, the 4 products of 4 unsigned 8-bit activations with 4 signed 8-bit weights.

``C[i] += sum_k u8(A[k]) * i8(B[i, k])`` for i < 16, k < 4 (int32, exact).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_DOT_16X4 = "fgq_dot_16x4_u8i8i32_vnni"
LANES = 16
DOT_DEPTH = 4


@T.prim_func(s_tir=True)
def _dot_16x4_description(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        activation_word = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        activations = T.reinterpret(T.broadcast(activation_word, 16), dtype="int8x64")
        weights = B.vload([0, 0], dtype="int8x64")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            activations,
            weights,
            dtype="int32x16",
        )


TensorIntrin.register(VNNI_DOT_16X4, _dot_16x4_description, _dot_16x4_vnni, override=True)


def has_vnni(target) -> bool:
    """True if ``target`` (an llvm :class:`tvm.target.Target`) has AVX-512 VNNI."""
    from tvm.target import codegen

    return bool(codegen.llvm_cpu_has_features(["avx512vnni"], target))
