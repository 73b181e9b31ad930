"""The project's own CUDA tensor intrinsics for the tensor-core GEMM, beside the TVM ones it uses.

The GEMM multiplies the activation bytes as they are stored (unsigned, ``q + offset``) by the
int8 weights: ``mma.sync.m16n8k32`` with a ``.u8`` A and an ``.s8`` B, which TVM 0.27's
intrinsics do not offer (its ldmatrix and MMA intrinsics are signed int8 only). So the
activations need no conversion on their way to shared memory, and are copied 16 bytes at a time.

* :data:`LDMATRIX_U8_A`: a 16x32 ``uint8`` fragment of A from shared memory into the registers
  of a warp, one ``ldmatrix.x4`` (the layout of TVM's ``mma_ldmatrix_i8_a``:
  :func:`operand_fragment_layout`);
* :data:`MMA_U8S8S32_TRANS_B`: ``C[16, 16] += A[16, 32] (u8) * B[16, 32]^T (s8)`` in int32, two
  ``mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32``;
* :data:`LDMATRIX_I8_B_TRANS`: a 16x32 ``int8`` fragment of B, stored ``[N, K]`` (TVM's own
  template);
* :data:`STORE_TO_SHARED`: a 16x16 int32 accumulator fragment to shared memory (TVM's own
  template).

The shared memory is dynamic (:data:`SHARED_SCOPE`: one allocation per kernel, of the size the
launch asks for, beyond the 48 KiB of static shared memory), for which TVM 0.27 registers no
int8 intrinsics. TVM's ``mma_fill_16x16_i32`` is used as it is. They are registered on first use
(:func:`intrinsics`), TVM's through
:func:`~fgq_tvm.schedules.tvmscript_parsing.import_tensor_intrinsics`: parsing them takes
seconds, and only a GPU build needs them.

NumPy reference: ``C += A.astype(int32) @ B.astype(int32).T``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .tvmscript_parsing import cheap_stacks, import_tensor_intrinsics

WARP = 32
FRAGMENT_M, FRAGMENT_N, FRAGMENT_K = 16, 16, 32
ACCUMULATORS = FRAGMENT_M * FRAGMENT_N // WARP  # int32 of a 16x16 fragment per thread

SHARED_SCOPE = "shared.dyn"  # where the GEMM's operand slices and accumulator tile live

LDMATRIX_U8_A = "fgq_ldmatrix_16x32_u8_a"
LDMATRIX_I8_B_TRANS = "fgq_ldmatrix_16x32_i8_b_trans"
MMA_U8S8S32_TRANS_B = "fgq_mma_16x16x32_u8s8s32_trans_b"
STORE_TO_SHARED = "fgq_mma_store_16x16_i32_shared"


def operand_fragment_layout(i, j):
    """``(thread, register byte)`` of element ``(i, j)`` of a 16x32 byte fragment (ldmatrix.x4,
    the A and B operands of m16n8k32)."""
    return 4 * (i % 8) + (j % 16) // 4, 8 * (j // 16) + (i // 8) * 4 + j % 4


def accumulator_fragment_layout(i, j):
    """``(thread, register)`` of element ``(i, j)`` of a 16x16 int32 accumulator fragment."""
    return 4 * (i % 8) + (j % 8) // 2, 4 * (j // 8) + (i // 8) * 2 + j % 2


def _own_intrinsics() -> dict:
    """This module's intrinsics as ``{name: (description, implementation)}``, parsed when
    called."""

    @T.prim_func(s_tir=True)
    def _ldmatrix_u8_a_desc(warp_handle: T.handle, shared_handle: T.handle) -> None:
        shared = T.match_buffer(
            shared_handle, (16, 32), "uint8", align=64, offset_factor=32, scope=SHARED_SCOPE
        )
        warp = T.match_buffer(
            warp_handle, (32, 16), "uint8", align=64, offset_factor=32, scope="warp"
        )
        with T.sblock("root"):
            T.reads(shared[0:16, 0:32])
            T.writes(warp[0:32, 0:16])
            for i, j in T.grid(16, 32):
                with T.sblock("shared_warp"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    thread, register = T.meta_var(operand_fragment_layout(vi, vj))
                    T.reads(shared[vi, vj])
                    T.writes(warp[thread, register])
                    warp[thread, register] = shared[vi, vj]

    @T.prim_func(s_tir=True)
    def _ldmatrix_u8_a_impl(warp_handle: T.handle, shared_handle: T.handle) -> None:
        stride = T.int32()
        unit = T.int32()
        shared = T.match_buffer(
            shared_handle,
            (16, 32),
            "uint8",
            align=64,
            offset_factor=32,
            scope=SHARED_SCOPE,
            strides=[stride, unit],
        )
        warp = T.match_buffer(
            warp_handle, (32, 16), "uint8", align=64, offset_factor=32, scope="warp"
        )
        with T.sblock("root"):
            T.reads(shared[0:16, 0:32])
            T.writes(warp[0:32, 0:16])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                # thread t points the x4 load at row t % 16, bytes 16 * (t // 16) of the tile
                T.evaluate(
                    T.ptx_legacy.ldmatrix(
                        False,
                        4,
                        ".b16",
                        warp.data,
                        warp.elem_offset + 16 * tx,
                        shared.access_ptr("r"),
                        stride * (tx % 16) + 16 * (tx // 16),
                        dtype="uint8",
                    )
                )

    @T.prim_func(s_tir=True)
    def _mma_u8s8s32_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 16), "uint8", align=64, offset_factor=32, scope="warp")
        B = T.match_buffer(b, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        C = T.match_buffer(c, (32, 8), "int32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:32, 0:16], B[0:32, 0:16])
            T.writes(C[0:32, 0:8])
            for i, j, k in T.grid(16, 16, 32):
                with T.sblock("C"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    thread_c, register_c = T.meta_var(accumulator_fragment_layout(vi, vj))
                    thread_a, register_a = T.meta_var(operand_fragment_layout(vi, vk))
                    thread_b, register_b = T.meta_var(operand_fragment_layout(vj, vk))
                    T.reads(
                        C[thread_c, register_c], A[thread_a, register_a], B[thread_b, register_b]
                    )
                    T.writes(C[thread_c, register_c])
                    C[thread_c, register_c] += T.Cast("int32", A[thread_a, register_a]) * T.Cast(
                        "int32", B[thread_b, register_b]
                    )

    @T.prim_func(s_tir=True)
    def _mma_u8s8s32_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (32, 16), "uint8", align=64, offset_factor=32, scope="warp")
        B = T.match_buffer(b, (32, 16), "int8", align=64, offset_factor=32, scope="warp")
        C = T.match_buffer(c, (32, 8), "int32", align=64, offset_factor=16, scope="warp")
        with T.sblock("root"):
            T.reads(C[0:32, 0:8], A[0:32, 0:16], B[0:32, 0:16])
            T.writes(C[0:32, 0:8])
            for tx in T.thread_binding(0, 32, "threadIdx.x"):
                for half in T.unroll(2):  # columns 8 * half of C: the B registers 8 * half on
                    T.evaluate(
                        T.ptx_legacy.mma(
                            "m16n8k32",
                            "row",
                            "col",
                            "uint8",
                            "int8",
                            "int32",
                            A.data,
                            A.elem_offset + 16 * tx,
                            B.data,
                            B.elem_offset + 16 * tx + 8 * half,
                            C.data,
                            C.elem_offset + 8 * tx + 4 * half,
                            False,
                            dtype="int32",
                        )
                    )

    return {
        LDMATRIX_U8_A: (_ldmatrix_u8_a_desc, _ldmatrix_u8_a_impl),
        MMA_U8S8S32_TRANS_B: (_mma_u8s8s32_desc, _mma_u8s8s32_impl),
    }


@functools.cache
def intrinsics() -> SimpleNamespace:
    """The intrinsics the tensor-core GEMM tensorizes with, registered on first use: the names
    of this module's and of TVM's (``tvm.s_tir.tensor_intrin.cuda``)."""
    import_tensor_intrinsics()
    from tvm.s_tir.tensor_intrin import cuda

    with cheap_stacks():
        own = _own_intrinsics()
    for name, (description, implementation) in own.items():
        TensorIntrin.register(name, description, implementation, override=True)
    load_b = cuda.get_ldmatrix_intrin(FRAGMENT_K, "int8", "B", True, SHARED_SCOPE)
    TensorIntrin.register(LDMATRIX_I8_B_TRANS, *load_b, override=True)
    store = cuda.get_mma_store_intrin("int32", ACCUMULATORS, SHARED_SCOPE, False)
    TensorIntrin.register(STORE_TO_SHARED, *store, override=True)
    return SimpleNamespace(
        load_a=LDMATRIX_U8_A,
        load_b=LDMATRIX_I8_B_TRANS,
        mma=MMA_U8S8S32_TRANS_B,
        fill=cuda.MMA_fill_16x16_i32_INTRIN,
        store=STORE_TO_SHARED,
    )
