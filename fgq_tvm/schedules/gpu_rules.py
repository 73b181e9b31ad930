"""The default GPU schedule: DLight's GPU rules for every PrimFunc not scheduled yet.

The GPU cores (:mod:`~fgq_tvm.schedules.conv2d_cuda`) state their compute and leave their
schedule to these rules, as do the operators between the kernels (pooling, means, layout edges)
and the load-time packs. In order, the first rule that applies schedules a PrimFunc:

* ``TensorCoreGemm`` (:mod:`~fgq_tvm.schedules.tensor_core_gemm`): the GEMM core's layers, on
  the int8 tensor cores;
* ``Matmul``: a GEMM (a reduction whose operands are indexed by the output's two axes and the
  reduction axis; producers such as an im2col are inlined into its shared-memory tiles and
  consumers into its stores); int8 tensor cores where the target has them and all three
  extents exceed 64;
* ``GEMV``, ``Reduction``, ``GeneralReduction``: reductions to vectors and scalars (means,
  sums), one thread block per output;
* ``Fallback``: anything else, one thread per output element, reductions serial in it.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight

from .core import is_scheduled
from .tensor_core_gemm import TensorCoreGemm


def gpu_rules() -> tuple:
    """DLight's GPU schedule rules, in the order they are tried."""
    return (
        TensorCoreGemm(),
        dlight.gpu.Matmul(),
        dlight.gpu.GEMV(),
        dlight.gpu.Reduction(),
        dlight.gpu.GeneralReduction(),
        dlight.gpu.Fallback(),
    )


def schedule_for_gpu(mod: tvm.IRModule, target) -> tvm.IRModule:
    """``mod`` with every PrimFunc that is not scheduled yet scheduled for ``target`` (see the
    module docstring).

    Raises
    ------
    ValueError
        A PrimFunc is left without a schedule: no rule applies to it.
    """
    with target:
        scheduled = dlight.ApplyDefaultSchedule(*gpu_rules())(mod)
    for global_var, func in scheduled.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc) and not is_scheduled(func):
            raise ValueError(f"no GPU schedule rule applies to {global_var.name_hint}")
    return scheduled
