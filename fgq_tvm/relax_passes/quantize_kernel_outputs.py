"""QuantizeKernelOutputs: activations pass between int8 kernels as bytes, not float32.

Each kernel quantizes its float32 input first (``clamp(round(x / s_x))``, stored as the bytes
the int8 dot core multiplies). Where every reader of a kernel's output is a kernel of that kind
with the same activation quantizer, reading it as its input, the writer can run that stage in
its epilogue instead. This pass rewrites, where ``fgq_a`` and ``fgq_b`` (and ``fgq_c``) are
quantized kernels on a core that reads and writes activation bytes
(:attr:`~fgq_tvm.schedules.core.Core.activation_bytes`)::

    y = R.call_tir(fgq_a, (x, ...), f32)         y = R.call_tir(fgq_a_quantized_out, (x, ...), u8)
    z = R.call_tir(fgq_b, (y, ...), f32)   ->    z = R.call_tir(fgq_b_quantized_in, (y, ...), f32)
    w = R.call_tir(fgq_c, (y, ...), f32)         w = R.call_tir(fgq_c_quantized_in, (y, ...), f32)

``fgq_a_quantized_out`` is ``fgq_a`` with the quantizer in its
:class:`~fgq_tvm.schedules.conv2d.Epilogue`; the readers take the bytes as they are (only
padding them). The values are unchanged: the writer computes the float32 result as before and
quantizes it with the readers' float32 operations, so every kernel's output is bit-identical.
The activation makes one trip through memory as bytes instead of two as floats, and each
reader skips its quantize stage. A value that anything else reads (a residual add, a pooling,
the function's result) stays float32. Run after
:class:`~fgq_tvm.relax_passes.FuseLayerEpilogues`, which makes the writer's ReLU its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..quant.layers import ActQuant, QuantizedLayer
from ..schedules.kernel_spec import KernelSpec
from ..schedules.select import core_named
from ._mutation import mutate_relax_functions, variable_uses, without_unused_kernels


@tvm.transform.module_pass(opt_level=0, name="QuantizeKernelOutputs")
class QuantizeKernelOutputs:
    """Let kernels write the activation bytes their only readers quantize (see the module
    docstring).

    Parameters
    ----------
    layers
        The quantized layers by name (the kernels' ``fgq.layer`` attribute).
    """

    def __init__(self, layers: Mapping[str, QuantizedLayer]):
        self.layers = dict(layers)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        return without_unused_kernels(mutate_relax_functions(mod, _Rewriter(mod, self.layers)))


@mutator
class _Rewriter(PyExprMutator):
    """Decides which values of a function become bytes, then rebinds their kernel calls (and
    the values' variables, whose type changes)."""

    def __init__(self, mod: tvm.IRModule, layers: Mapping[str, QuantizedLayer]):
        super().__init__(mod)
        self.layers = layers
        self.call_tir = tvm.ir.Op.get("relax.call_tir")
        self.values: dict = {}  # variable -> bound value, of the function being visited
        self.replaced: dict = {}  # variable -> its rewritten kernel call

    def visit_function_(self, func: relax.Function) -> relax.Expr:
        bindings = [b for block in func.body.blocks for b in block.bindings]
        self.values = {b.var: b.value for b in bindings if isinstance(b, relax.VarBinding)}
        specs = {var: self._spec(value) for var, value in self.values.items()}
        specs = {var: spec for var, spec in specs.items() if spec is not None}
        readers: dict = {}
        for var in specs:
            source = self._input(var)
            if isinstance(source, relax.Var) and source in specs:
                readers.setdefault(source, []).append(var)
        uses = variable_uses(func)
        quantized = {
            var: specs[reading[0]].layer.act
            for var, reading in readers.items()
            if self._can_quantize(var, reading, specs, uses[var])
        }
        self.replaced = {}
        for var, spec in specs.items():
            quantize, reads_bytes = quantized.get(var), self._input(var) in quantized
            if quantize is not None or reads_bytes:
                self.replaced[var] = self._rewritten_call(var, spec, quantize, reads_bytes)
        return super().visit_function_(func)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var not in self.replaced:
            super().visit_var_binding_(binding)
            return
        value = self.visit_expr(self.replaced[binding.var])
        var_type = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) else relax.Var
        new_var = var_type(binding.var.name, value.ty)
        self.builder_.emit_normalized(relax.VarBinding(new_var, value))
        self.set_var_remap(binding.var, new_var)

    def _spec(self, value) -> KernelSpec | None:
        """The spec of a quantized kernel call on a core that reads and writes bytes."""
        if not (isinstance(value, relax.Call) and value.op.same_as(self.call_tir)):
            return None
        spec = KernelSpec.of(self.builder_.get()[value.args[0]], self.layers)
        if spec is None or not core_named(spec.core).activation_bytes:
            return None
        return spec

    def _arguments(self, var: relax.Var) -> list[relax.Expr]:
        """The arguments of the kernel call bound to ``var``."""
        return list(self.values[var].args[1].fields)

    def _input(self, var: relax.Var) -> relax.Expr:
        """The input activation of the kernel call bound to ``var``."""
        return self._arguments(var)[0]

    def _can_quantize(self, var, reading: list, specs: Mapping, uses: int) -> bool:
        """Whether ``var`` (a kernel's float output) is read only as the input of the kernels
        ``reading``, all with one quantizer and the layout it is written in."""
        writer = specs[var]
        if writer.epilogue.quantize is not None or len(reading) != uses:
            return False
        if any(self._arguments(reader).count(var) > 1 for reader in reading):  # a residual too
            return False
        acts = {specs[reader].layer.act for reader in reading}
        layouts = {specs[reader].layouts.input for reader in reading}
        return len(acts) == 1 and layouts == {writer.layouts.output}

    def _rewritten_call(
        self, var: relax.Var, spec: KernelSpec, quantize: ActQuant | None, reads_bytes: bool
    ) -> relax.Call:
        call = self.values[var]
        kernel_var = call.args[0]
        kernel = self.builder_.get()[kernel_var]
        epilogue = replace(spec.epilogue, quantize=quantize)
        new_spec = replace(spec, epilogue=epilogue, quantized_input=reads_bytes)
        name = kernel_var.name_hint + "_quantized_in" * reads_bytes
        name += "_quantized_out" * (quantize is not None)
        func = new_spec.kernels().layer.with_attrs({**kernel.attrs, **new_spec.attributes(name)})
        new_var = self.builder_.add_func(func, name)
        out_type = relax.TensorType(call.ty.shape, epilogue.output_dtype)
        return relax.call_tir(new_var, call.args[1], out_type)
