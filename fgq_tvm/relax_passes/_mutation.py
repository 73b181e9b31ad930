"""The module-level loop shared by the Python-side Relax passes."""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator


def mutate_relax_functions(mod: tvm.IRModule, rewriter: PyExprMutator) -> tvm.IRModule:
    """Run ``rewriter`` (constructed on ``mod``) over every Relax function of ``mod``."""
    for global_var, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(global_var, rewriter.visit_expr(func))
    return rewriter.builder_.finalize()
