"""WidenByteBroadcasts: 8-bit vector broadcasts wider than 4 lanes as broadcast 32-bit words.

TVM 0.27's CUDA codegen prints a broadcast of an 8-bit value to 4 lanes as one packed 32-bit
word, but to 8 or 16 lanes as ``make_uint2``/``make_uint4`` with 8 or 16 byte arguments, which
nvcc rejects ("too many arguments in function call"). The tensor-core GEMM meets one in every
16-byte copy of the im2col (:mod:`~fgq_tvm.schedules.tensor_core_gemm`: the padding bytes).

The pass rewrites, after TVM's lowering (vectorized loops are vectors by then)::

    Broadcast(v: uint8, 16)
        -> reinterpret(uint8x16, Broadcast(u32(v) * 0x01010101, 4))

and likewise for ``int8`` and 8 lanes: the same bytes, as a vector of 32-bit words CUDA has.
Other expressions are left as they are. The pass runs in fgq-tvm's CUDA TIR pipeline
(:mod:`~fgq_tvm.schedules.cuda_pipeline`).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.prim.expr import Broadcast

WORD_BYTES = 4
REPEATED_BYTE = 0x01010101  # a byte times this: the byte in each of a word's four bytes


def _widened(broadcast: Broadcast):
    dtype = broadcast.ty.dtype
    if dtype.bits != 8 or dtype.lanes <= WORD_BYTES or dtype.lanes % WORD_BYTES:
        return broadcast
    value = broadcast.value
    if isinstance(value, tirx.IntImm):
        word = tirx.const((int(value.value) & 0xFF) * REPEATED_BYTE, "uint32")
    else:  # the byte's bits, not its sign, in each byte of the word
        byte = tirx.Cast("uint32", tirx.Cast("uint8", value))
        word = byte * tirx.const(REPEATED_BYTE, "uint32")
    return tirx.reinterpret(str(dtype), Broadcast(word, dtype.lanes // WORD_BYTES))


@tvm.transform.module_pass(opt_level=0, name="WidenByteBroadcasts")
def WidenByteBroadcasts(mod: tvm.IRModule, _context) -> tvm.IRModule:  # noqa: N802 (a pass)
    """The pass (see the module docstring)."""
    return tvm_ffi.structural_map(mod, ((Broadcast, _widened),))
