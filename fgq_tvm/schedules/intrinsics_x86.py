"""The project's own x86 dot-product tensor intrinsics, one per integer dot core.

Each adds, for every output lane ``i``, ``depth`` products of one broadcast activation word with
a weight tile: ``C[i] += sum_k A[k] * B[i, k]`` (int32, exact):

* ``fgq_dot_16x4_u8i8i32_vnni`` (AVX-512 VNNI): 16 lanes x 4 unsigned 8-bit activations times
  signed 8-bit weights, one ``vpdpbusd``. The wheel's ``dot_16x4_vnni`` passes ``<16 x i32>``
  operands to ``llvm.x86.avx512.vpdpbusd.512``, whose signature in the LLVM inside the wheel
  takes ``<64 x i8>`` multiplicands, so everything tensorized with it dies in LLVM's verifier
  (DESIGN.md); this one reinterprets the broadcast word and the tile as ``int8x64``.
* ``fgq_dot_8x2_i16i16i32_avx2`` (AVX2, no VNNI): 8 lanes x 2 activations times weights, both
  16-bit, one ``vpmaddwd`` and one add. AVX2's byte product ``vpmaddubsw`` saturates its 16-bit
  pair sums (255 * 127 * 2 > 32767), so it is exact only for weights in {-1, 0, 1}; widening to
  16 bits is exact for every int8 weight and every activation byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .tvmscript_parsing import cheap_stacks


@dataclass(frozen=True)
class DotInstruction:
    """A dot-product intrinsic and the register tile it implies.

    Attributes
    ----------
    intrinsic
        Name under which the tensor intrinsic is registered.
    lanes
        Output channels per accumulator vector (int32 lanes).
    depth
        Input channels per activation word (products summed per lane).
    activation_dtype, weight_dtype
        Element types of the activation word and the weight tile.
    feature
        The LLVM CPU feature the target needs.
    accumulators
        Vector registers the schedule may give to int32 accumulators.
    """

    intrinsic: str
    lanes: int
    depth: int
    activation_dtype: str
    weight_dtype: str
    feature: str
    accumulators: int

    def available(self, target) -> bool:
        """True if ``target`` (an llvm :class:`tvm.target.Target`) has :attr:`feature`."""
        from .. import cpu_features

        return cpu_features.target_has(target, self.feature)


VNNI_DOT = DotInstruction("fgq_dot_16x4_u8i8i32_vnni", 16, 4, "uint8", "int8", "avx512vnni", 16)
AVX2_DOT = DotInstruction("fgq_dot_8x2_i16i16i32_avx2", 8, 2, "int16", "int16", "avx2", 8)


with cheap_stacks():  # TVMScript parses these without inspect.stack's cost

    def _description(instruction: DotInstruction):
        lanes, depth = instruction.lanes, instruction.depth

        @T.prim_func(s_tir=True)
        def description(
            A: T.Buffer((depth,), instruction.activation_dtype, offset_factor=1),
            B: T.Buffer((lanes, depth), instruction.weight_dtype, offset_factor=1),
            C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
        ) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
                T.writes(C[0:lanes])
                for i in T.serial(0, lanes):
                    for k in T.serial(0, depth):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

        return description

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

    @T.prim_func(s_tir=True)
    def _dot_8x2_avx2(
        A: T.Buffer((2,), "int16", offset_factor=1),
        B: T.Buffer((8, 2), "int16", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:2], B[0:8, 0:2])
            T.writes(C[0:8])
            activation_word = T.reinterpret(A.vload([0], "int16x2"), dtype="int32")
            activations = T.reinterpret(T.broadcast(activation_word, 8), dtype="int16x16")
            weights = B.vload([0, 0], dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                activations,
                weights,
                dtype="int32x8",
            )

    for _instruction, _implementation in ((VNNI_DOT, _dot_16x4_vnni), (AVX2_DOT, _dot_8x2_avx2)):
        TensorIntrin.register(
            _instruction.intrinsic, _description(_instruction), _implementation, override=True
        )


def has_vnni(target) -> bool:
    """True if ``target`` (an llvm :class:`tvm.target.Target`) has AVX-512 VNNI."""
    return VNNI_DOT.available(target)
