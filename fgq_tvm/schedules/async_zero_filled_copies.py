"""AsyncZeroFilledCopies: padded global-to-shared copies of a pipeline's async stage as cp.async.

A software-pipelined stage marked asynchronous (``software_pipeline_async_stages``) has its
global-to-shared copies turned into ``cp.async`` by TVM's ``InjectPTXAsyncCopy`` (with the
PassContext option ``tirx.use_async_copy``), and grouped and awaited by the pipeline (the
``async_commit_queue_scope`` around the stage's statements). TVM 0.27 makes that copy
asynchronous when it is a plain load, or a load guarded by ``if_then_else`` whose other value is
a float zero; a copy whose other value is an integer zero stays synchronous. The im2col copy of
the tensor-core GEMM (:mod:`~fgq_tvm.schedules.tensor_core_gemm`) is one: the padding of
activation bytes is the byte 0.

The pass rewrites, inside an ``async_commit_queue_scope``, after TVM's lowering::

    shared[Ramp(d, 1, n)] = if_then_else(p, src[Ramp(s, 1, n)], Broadcast(0, n))
        -> cp_async_raw(shared.data, d, src.data, s, n * bytes, p)

(also where the store's index is ``Ramp(d, 1, n) + Broadcast(o, n)``: a buffer merged into
one allocation with others, at ``d + o``),

where ``shared`` is in shared memory, ``src`` in global memory, ``p`` is one condition for the
whole vector and the copy moves 4, 8 or 16 bytes: a predicated ``cp.async`` that writes zeros
where ``p`` is false. The stage's commit and wait already cover the statement, as they cover
the copies TVM converted. Everything else is left as it is.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.ir.prim.expr import Add, Broadcast, Ramp

ASYNC_STAGE = "async_commit_queue_scope"
ASYNC_COPY = "tirx.s_tir.cp_async_raw"
IF_THEN_ELSE = "prim.if_then_else"
ASYNC_COPY_BYTES = (4, 8, 16)
SHARED_SCOPES = ("shared", "shared.dyn")


def _contiguous_base(indices) -> tvm.ir.Expr | None:
    """The first index of a one-dimensional access to consecutive elements, else ``None``:
    ``Ramp(b, 1, n)``, or ``Ramp(b, 1, n) + Broadcast(o, n)`` (an access to a buffer that TVM
    merged into one allocation with others, at offset ``o``)."""
    if len(indices) != 1:
        return None
    index = indices[0]
    if isinstance(index, Add) and isinstance(index.b, Broadcast):
        base = _contiguous_base([index.a])
        return None if base is None else base + index.b.value
    if not isinstance(index, Ramp) or not _is_one(index.stride):
        return None
    return index.base


def _is_one(value) -> bool:
    return isinstance(value, tirx.IntImm) and int(value.value) == 1


def _is_zero_vector(value) -> bool:
    return (
        isinstance(value, Broadcast)
        and isinstance(value.value, tirx.IntImm | tirx.FloatImm)
        and value.value.value == 0
    )


def _async_copy(store: tirx.BufferStore):
    """``store`` as a predicated cp.async where it is a zero-padded vector copy (above)."""
    value = store.value
    if store.buffer.scope() not in SHARED_SCOPES or not isinstance(value, tvm.ir.Call):
        return store
    if value.op != tvm.ir.Op.get(IF_THEN_ELSE) or not _is_zero_vector(value.args[2]):
        return store
    predicate, load = value.args[0], value.args[1]
    if not isinstance(load, tvm.ir.TensorLoad) or load.source.scope() != "global":
        return store
    if predicate.ty.dtype.lanes != 1 or load.source.dtype != store.buffer.dtype:
        return store
    destination, source = _contiguous_base(store.indices), _contiguous_base(load.indices)
    size = value.ty.dtype.lanes * value.ty.dtype.bits // 8
    if destination is None or source is None or size not in ASYNC_COPY_BYTES:
        return store
    arguments = [store.buffer.data, destination, load.source.data, source, size, predicate]
    copy = tvm.ir.Call(
        tvm.ir.Op.get(ASYNC_COPY), arguments, ret_ty=tvm.ir.PrimType(str(store.buffer.dtype))
    )
    return tirx.Evaluate(copy)


def _in_async_stage(attr: tirx.AttrStmt):
    if attr.attr_key != ASYNC_STAGE:
        return attr
    body = tvm_ffi.structural_map(attr.body, ((tirx.BufferStore, _async_copy),))
    return tirx.AttrStmt(attr.node, attr.attr_key, attr.value, body)


@tvm.transform.module_pass(opt_level=0, name="AsyncZeroFilledCopies")
def AsyncZeroFilledCopies(mod: tvm.IRModule, _context) -> tvm.IRModule:  # noqa: N802 (a pass)
    """The pass (see the module docstring)."""
    return tvm_ffi.structural_map(mod, ((tirx.AttrStmt, _in_async_stage),))
