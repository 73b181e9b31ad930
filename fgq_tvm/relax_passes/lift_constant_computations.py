"""LiftConstantComputations: work on constants leaves ``main`` for a ``prepare`` function.

Rewrites::

    @R.function
    def main(x):
        with R.dataflow():
            w = R.call_tir(pack, (c0, c1), ...)       # reads constants only
            y = R.call_tir(layer, (x, w, c2), ...)
            R.output(y)
        return y

into::

    @R.function
    def prepare():
        with R.dataflow():
            w = R.call_tir(pack, (c0, c1), ...)
            prepared = (w,)
            R.output(prepared)
        return prepared

    @R.function
    def main(x, prepared: R.Tuple(...)):
        with R.dataflow():
            w = prepared[0]
            y = R.call_tir(layer, (x, w, c2), ...)
            R.output(y)
        return y

A dataflow binding is lifted when everything it reads is a constant or a lifted binding, so
nothing in it depends on ``main``'s inputs. The runtime calls ``prepare`` once when it loads the
module and passes the result to every call of ``main``: weights are packed for the kernels once,
while the module stores them compact. ``prepare`` is always emitted (returning an empty tuple
when nothing is lifted), so every module has the same calling convention.

A pipeline with ``FoldConstant`` would evaluate ``prepare`` at compile time and store its
(larger) results in the module; ``tvm.compile``'s CPU pipeline folds no constants.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.analysis import free_vars
from tvm.relax.utils import copy_with_new_vars

PREPARE = "prepare"


@tvm.transform.module_pass(opt_level=0, name="LiftConstantComputations")
class LiftConstantComputations:
    """Move ``main``'s computations on constants into ``prepare`` (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod["main"]
        lifted = _liftable_bindings(main.body)
        outputs = _lifted_outputs(main.body, lifted)
        prepared = relax.Var("prepared", relax.TupleType([var.ty for var in outputs]))
        result = tvm.IRModule(dict(mod.functions_items()), mod.attrs, mod.global_infos)
        result["main"] = _main_reading_prepared(main, lifted, outputs, prepared)
        result[PREPARE] = _prepare_function(main.body, lifted, outputs)
        return result


def _liftable_bindings(body: relax.SeqExpr) -> set:
    """The variables of the dataflow bindings that read only constants and lifted bindings."""
    lifted: set = set()
    for block in body.blocks:
        if not isinstance(block, relax.DataflowBlock):
            continue
        for binding in block.bindings:
            reads = free_vars(binding.value)
            if isinstance(binding, relax.VarBinding) and all(var in lifted for var in reads):
                lifted.add(binding.var)
    return lifted


def _lifted_outputs(body: relax.SeqExpr, lifted: set) -> list:
    """The lifted variables that the rest of ``main`` reads, in binding order."""
    read = {var for var in free_vars(body.body) if var in lifted}
    for block in body.blocks:
        for binding in block.bindings:
            if binding.var not in lifted:
                read.update(var for var in free_vars(binding.value) if var in lifted)
    return [b.var for block in body.blocks for b in block.bindings if b.var in read]


def _main_reading_prepared(main: relax.Function, lifted: set, outputs: list, prepared):
    """``main`` with one more parameter; lifted outputs read from it, other lifted bindings
    dropped."""
    position = {var: index for index, var in enumerate(outputs)}

    def rebind(binding):
        if binding.var not in lifted:
            return binding
        return relax.VarBinding(binding.var, relax.TupleGetItem(prepared, position[binding.var]))

    blocks = []
    for block in main.body.blocks:
        kept = [rebind(b) for b in block.bindings if b.var not in lifted or b.var in position]
        blocks.append(type(block)(kept))
    body = relax.SeqExpr(blocks, main.body.body)
    func = relax.Function([*main.params, prepared], body, main.ret_ty, main.is_pure, main.attrs)
    return relax.BlockBuilder().normalize(func)


def _prepare_function(body: relax.SeqExpr, lifted: set, outputs: list) -> relax.Function:
    """``prepare()``: the lifted bindings and the tuple of their outputs."""
    bindings = [b for block in body.blocks for b in block.bindings if b.var in lifted]
    result = relax.Var("prepared", relax.TupleType([var.ty for var in outputs]))
    block = relax.DataflowBlock([*bindings, relax.VarBinding(result, relax.Tuple(outputs))])
    func = relax.Function([], relax.SeqExpr([block], result), result.ty)
    func = relax.BlockBuilder().normalize(func)
    return copy_with_new_vars(func).with_attr("global_symbol", PREPARE)
