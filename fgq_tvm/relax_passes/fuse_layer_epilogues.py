"""FuseLayerEpilogues: a residual add and a ReLU after a quantized layer join its kernel.

Rewrites, where ``fgq_conv`` is a kernel of
:class:`~fgq_tvm.relax_passes.LegalizeQuantizedLayers` (attribute ``fgq.layer``) and each
intermediate value has no other use::

    y = R.call_tir(fgq_conv, (x, *weights), out)        y = R.call_tir(fgq_conv_add_relu,
    s = R.add(y, residual)                     ->                      (x, *weights, residual),
    z = R.nn.relu(s)                                                   out)

and likewise ``R.add`` alone (``fgq_conv_add``; either operand may be the layer's) and
``R.nn.relu`` alone (``fgq_conv_relu``). The fused call takes the place of the last operation
(the residual may be computed after the layer), the layer's and the add's bindings go, and so
does the plain kernel once nothing calls it. The new kernel is the layer's kernel rebuilt with
an :class:`~fgq_tvm.schedules.conv2d.Epilogue`,
which computes ``max(conv + bias + residual, 0)`` in float32 in the reference's order: the
result is bit-identical, and the activations make one trip through memory instead of three.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import tvm
from tvm import relax

from ..quant.layers import QuantizedLayer
from ..schedules.core import Epilogue
from ..schedules.kernel_spec import KernelSpec
from ._mutation import variable_uses, without_unused_kernels


@tvm.transform.module_pass(opt_level=0, name="FuseLayerEpilogues")
class FuseLayerEpilogues:
    """Fuse residual adds and ReLUs into the quantized kernels before them.

    Parameters
    ----------
    layers
        The quantized layers by name (the kernels' ``fgq.layer`` attribute): their kernels are
        rebuilt with the epilogue.
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer]):
        self.layers = dict(layers)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        builder = relax.BlockBuilder(mod)
        for global_var, func in mod.functions_items():
            if isinstance(func, relax.Function):
                builder.update_func(global_var, _Fuser(builder, self.layers).rewrite(func))
        return without_unused_kernels(builder.finalize())


class _Fuser:
    """Finds the fusable chains of one function and rewrites its bindings."""

    def __init__(self, builder: relax.BlockBuilder, layers: Mapping[str, QuantizedLayer]):
        self.builder = builder
        self.layers = layers
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.add = tvm.ir.Op.get("relax.add")
        self.relu = tvm.ir.Op.get("relax.nn.relu")

    def rewrite(self, func: relax.Function) -> relax.Function:
        bindings = [b for block in func.body.blocks for b in block.bindings]
        self.values = {b.var: b.value for b in bindings if isinstance(b, relax.VarBinding)}
        self.uses = variable_uses(func)
        replaced: dict = {}
        dropped: set = set()
        for binding in reversed(bindings):  # outermost operation first: the longest chain
            fused = None if binding.var in dropped else self._fuse(binding.var)
            if fused is not None:
                replaced[binding.var], consumed = fused
                dropped.update(consumed)
        blocks = [
            type(block)(
                [
                    relax.VarBinding(b.var, replaced[b.var]) if b.var in replaced else b
                    for b in block.bindings
                    if b.var not in dropped
                ]
            )
            for block in func.body.blocks
        ]
        body = relax.SeqExpr(blocks, func.body.body)
        new = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        return self.builder.normalize(new)

    def _fuse(self, root: relax.Var):
        """``(fused call, variables it makes dead)`` if ``root`` ends a fusable chain."""
        value = self.values.get(root)
        consumed = set()
        relu = self._is_call(value, self.relu)
        if relu:
            operand = value.args[0]
            if not self._single_use(operand):
                return None
            consumed.add(operand)
            value = self.values.get(operand)
        if self._is_call(value, self.add):
            layer_var, residual = self._layer_operand(value.args)
        elif relu:
            layer_var, residual = operand, None
        else:
            return None
        if layer_var is None or not self._is_layer_call(self.values.get(layer_var)):
            return None
        consumed.add(layer_var)
        epilogue = Epilogue(residual=residual is not None, relu=relu)
        return self._fused_call(self.values[layer_var], epilogue, residual), consumed

    def _layer_operand(self, operands) -> tuple:
        """``(layer output, residual)`` of an add, or ``(None, None)``."""
        for mine, other in (operands, operands[::-1]):
            if self._is_layer_call(self.values.get(mine)) and self._single_use(mine):
                return mine, other
        return None, None

    def _fused_call(self, call: relax.Call, epilogue: Epilogue, residual) -> relax.Call:
        kernel_var, arguments = call.args[0], list(call.args[1].fields)
        kernel = self.builder.get()[kernel_var]
        spec = replace(KernelSpec.of(kernel, self.layers), epilogue=epilogue)
        name = f"{kernel_var.name_hint}_{epilogue.name}"
        attrs = {**kernel.attrs, **spec.attributes(name)}
        new_var = self.builder.add_func(spec.kernels().layer.with_attrs(attrs), name)
        if residual is not None:
            arguments.append(residual)
        return relax.call_tir(new_var, arguments, call.ty)

    def _single_use(self, var) -> bool:
        return isinstance(var, relax.Var) and self.uses[var] == 1

    def _is_call(self, value, op) -> bool:
        return isinstance(value, relax.Call) and value.op.same_as(op)

    def _is_layer_call(self, value) -> bool:
        if not self._is_call(value, self.call_tir):
            return False
        kernel = self.builder.get()[value.args[0]]
        attrs = kernel.attrs if kernel.attrs is not None else {}
        return "fgq.layer" in attrs and not str(attrs.get("fgq.epilogue", ""))
