"""Helpers shared by the Python-side Relax passes."""

from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax
from tvm.relax.analysis import all_global_vars, free_vars
from tvm.relax.expr_functor import PyExprMutator


def mutate_relax_functions(mod: tvm.IRModule, rewriter: PyExprMutator) -> tvm.IRModule:
    """Run ``rewriter`` (constructed on ``mod``) over every Relax function of ``mod``."""
    for global_var, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(global_var, rewriter.visit_expr(func))
    return rewriter.builder_.finalize()


def variable_uses(func: relax.Function) -> Counter:
    """How often each variable of ``func``'s body is used (by bindings and the result)."""
    uses = Counter(free_vars(func.body.body))
    for block in func.body.blocks:
        for binding in block.bindings:
            uses.update(free_vars(binding.value))
    return uses


def without_unused_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` without the layer kernels that no Relax function calls any more (they carry a
    ``global_symbol``, so dead code elimination would keep them)."""
    used = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            used.update(var.name_hint for var in all_global_vars(func))
    kept = {
        var: func
        for var, func in mod.functions_items()
        if var.name_hint in used or "fgq.layer" not in (func.attrs or {})
    }
    return tvm.IRModule(kept, mod.attrs, mod.global_infos)
