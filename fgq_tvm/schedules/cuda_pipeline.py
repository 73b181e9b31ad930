"""fgq-tvm's TIR pipeline for CUDA: TVM's default one, with async copies, and two passes.

- TVM's default TIR pipeline, run with the PassContext option ``tirx.use_async_copy``
  (:data:`LOWERING_OPTIONS`): the copies of a software pipeline's asynchronous stage become
  ``cp.async`` (:mod:`~fgq_tvm.schedules.tensor_core_gemm` pipelines its copies into shared
  memory). Its dynamic shared buffers become one allocation, in which those never live at once
  share bytes (the GEMM's accumulator tile reuses its operand slices); its barriers treat them
  as one buffer, so a warp writing those bytes waits for the warps still reading them.
- :class:`~fgq_tvm.schedules.async_zero_filled_copies.AsyncZeroFilledCopies`: the copies of
  such a stage padded with zero bytes, which TVM leaves synchronous, as predicated ``cp.async``.
- :class:`~fgq_tvm.schedules.widen_byte_broadcasts.WidenByteBroadcasts`: byte broadcasts of 8
  and 16 lanes in a form CUDA compiles.

:func:`cuda_tir_pipeline` registers it under a name ``tvm.compile`` takes as its
``tir_pipeline``.
"""

from __future__ import annotations

import functools

import tvm

from .async_zero_filled_copies import AsyncZeroFilledCopies
from .widen_byte_broadcasts import WidenByteBroadcasts

PIPELINE = "fgq_cuda"
# cp.async for the copies of asynchronous pipeline stages
LOWERING_OPTIONS = {"tirx.use_async_copy": True}


def _with_lowering_options(lower: tvm.transform.Pass) -> tvm.transform.Pass:
    """``lower`` run in the current PassContext with :data:`LOWERING_OPTIONS` added."""

    @tvm.transform.module_pass(opt_level=0, name="LowerWithOptions")
    def lowered(mod: tvm.IRModule, _context) -> tvm.IRModule:
        current = tvm.transform.PassContext.current()
        context = tvm.transform.PassContext(
            opt_level=current.opt_level,
            required_pass=list(current.required_pass),
            disabled_pass=list(current.disabled_pass),
            instruments=list(current.instruments),
            config={**current.config, **LOWERING_OPTIONS},
        )
        with context:
            return lower(mod)

    return lowered


@functools.cache
def cuda_tir_pipeline() -> str:
    """Register, once, and return the name of the pipeline (see the module docstring)."""

    def pipeline():
        lower, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default")
        passes = [
            _with_lowering_options(lower),
            AsyncZeroFilledCopies,
            WidenByteBroadcasts,
        ]
        return tvm.transform.Sequential(passes), finalize_host, finalize_device

    tvm.tirx.register_tir_pipeline(PIPELINE, pipeline)
    return PIPELINE
