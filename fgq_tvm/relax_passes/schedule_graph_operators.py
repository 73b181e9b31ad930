"""ScheduleGraphOperators: parallel loops for the operators between the quantized kernels.

``tvm.compile``'s CPU pipeline builds the PrimFuncs that ``LegalizeOps`` makes of the remaining
Relax operators (max pooling, layout transforms, means, pads) as single-threaded loop nests.
This pass rewrites every PrimFunc that is not yet scheduled (the quantized kernels and
their packs carry ``tirx.is_scheduled``) with one rule, after DLight's normalisation:

* injective producers are inlined into their consumers (a pad into the pooling window);
* each remaining block runs its outer spatial loops fused in parallel, the innermost spatial
  loop serially inside (vectorised when the block is spatial only and the loop is short
  enough to be one vector), and its reduction loops, if any, innermost.

Blocks with fewer than :data:`MIN_PARALLEL_ELEMENTS` outputs stay serial: starting the thread
pool costs more than they do. The computation does not change, only its loop nest.
"""

from __future__ import annotations

import math

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.dlight import normalize_prim_func, try_inline_contiguous_spatial

from ..schedules.core import SCHEDULED, is_scheduled

MIN_PARALLEL_ELEMENTS = 4096
MAX_VECTOR_EXTENT = 64


@tvm.transform.module_pass(opt_level=0, name="ScheduleGraphOperators")
class ScheduleGraphOperators:
    """Give every unscheduled PrimFunc of the module parallel loops (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        result = tvm.IRModule(dict(mod.functions_items()), mod.attrs, mod.global_infos)
        for global_var, func in mod.functions_items():
            if isinstance(func, tvm.tirx.PrimFunc) and not is_scheduled(func):
                scheduled = schedule_operator(func)
                if scheduled is not None:
                    result[global_var] = scheduled.with_attr(SCHEDULED, True)
        return result


def schedule_operator(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc | None:
    """``func`` with parallel outer loops, or ``None`` if DLight cannot normalise it."""
    sch = Schedule(func)
    blocks = normalize_prim_func(sch)
    if blocks is None:
        return None
    for block in try_inline_contiguous_spatial(sch, blocks):
        kinds = "".join(it.kind for it in block.iters)
        if not kinds.startswith("S") or "S" in kinds.lstrip("S"):
            continue  # no spatial loop outermost, or loops of other kinds between them
        spatial = block.iters[: len(kinds) - len(kinds.lstrip("S"))]
        extents = [int(it.dom) for it in spatial]
        if math.prod(extents) < MIN_PARALLEL_ELEMENTS:
            continue
        if len(spatial) == 1 or extents[-1] > MAX_VECTOR_EXTENT:
            sch.parallel(sch.fuse(*(it.loop_rv for it in spatial)))
            continue
        *outer, inner = (it.loop_rv for it in spatial)
        sch.parallel(sch.fuse(*outer))
        reductions = [it.loop_rv for it in block.iters[len(spatial) :]]
        if reductions:  # the window loops outside, one vector of outputs accumulated inside
            sch.reorder(*reductions, inner)
        sch.vectorize(inner)
        if reductions:
            sch.decompose_reduction(block.block_rv, reductions[0])
    return sch.mod["main"]
