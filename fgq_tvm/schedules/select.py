"""Which core computes a layer on a target, and its scheduled PrimFuncs.

Cores:

* the integer dot cores (:mod:`~fgq_tvm.schedules.conv2d_dot`): ``int8-dot-vnni`` on a target
  with AVX-512 VNNI, else ``int16-dot-avx2`` on one with AVX2. They compute integer weights
  (int8 layers, or ternary with int8 group scales), and ternary weights with float scales in
  groups of a multiple of their word (4 or 2 channels) on unsigned activations. Their weights
  are packed into the dot instruction's layout once, when the module is loaded (the ``pack``
  PrimFunc);
* ``popcount-vpopcntdq`` (:mod:`~fgq_tvm.schedules.conv2d_popcount`): ternary weights with
  one scale per group (not asymmetric ones, which go to a dot core) in
  groups of whole 64-channel words on unsigned activations of at most 4 bits, on a target with
  AVX-512 VPOPCNTDQ but no VNNI (bit masks packed at load time; NCHW only). Where VNNI is
  there, its dot core is 2.8-6.1x faster on every such ResNet-18 layer (4-bit activations,
  N=64); without it, the popcount core takes 0.93x the AVX2 dot core's time over those layers
  (``benchmarks/results/popcount-core-resnet18.md``);
* ``bitplane`` (:mod:`~fgq_tvm.schedules.conv2d`): everything else (float group scales on
  signed activations or odd group sizes, targets without AVX2); it reads the stored 2-bit
  weights directly.

Both compute the same numbers (``reference_forward``) from the layer's stored arguments
(:func:`~fgq_tvm.relax_passes.legalize_quantized_layers.kernel_arguments`, ternary weights in
the core's :func:`ternary_storage`). The dot cores
read and write their activations in either layout of :mod:`~fgq_tvm.schedules.layout`, the
bitplane core in NCHW only (:func:`kernel_layouts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tvm

from ..quant.layers import ActQuant
from . import conv2d_dot, conv2d_popcount
from .conv2d import (
    NO_EPILOGUE,
    Conv2dShape,
    Epilogue,
    TernaryStorage,
    WeightEncoding,
    conv2d_prim_func,
)
from .intrinsics_x86 import AVX2_DOT, VNNI_DOT, DotInstruction
from .layout import PLAIN, Layouts, activation_dims, from_layout, to_layout

Core = Literal["bitplane", "int8-dot-vnni", "int16-dot-avx2", "popcount-vpopcntdq"]
POPCOUNT: Core = "popcount-vpopcntdq"
DOT_CORES: dict[Core, DotInstruction] = {"int8-dot-vnni": VNNI_DOT, "int16-dot-avx2": AVX2_DOT}


TensorSpec = tuple[tuple[int, ...], str]  # (shape, dtype)


@dataclass(frozen=True)
class LayerKernels:
    """The PrimFuncs that compute one layer on one core.

    Attributes
    ----------
    core
        The core's name (printed in the compile summary).
    layer
        Runs per inference: ``(x, *prepared, *stored[packed_arguments:], y)``.
    output
        ``y``'s shape and dtype.
    pack
        Runs once at load time: ``(*stored[:packed_arguments], *prepared)``; ``None`` when the
        layer reads the stored arguments as they are.
    prepared
        Shape and dtype of each array ``pack`` writes.
    packed_arguments
        How many leading stored arguments ``pack`` consumes.
    layouts
        The layout of ``x``, and that of the residual and ``y``.

    ``x`` and ``y`` are float32, or activation bytes where the kernel reads or writes them
    (:func:`reads_activation_bytes`).
    """

    core: Core
    layer: tvm.tirx.PrimFunc
    output: TensorSpec
    pack: tvm.tirx.PrimFunc | None = None
    prepared: tuple[TensorSpec, ...] = ()
    packed_arguments: int = 0
    layouts: Layouts = PLAIN


def select_core(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding, target) -> Core:
    """The fastest exact core for this layer on ``target`` (``None``: portable default), in
    the order of the module docstring."""
    instruction = dot_instruction(target)
    if instruction == VNNI_DOT and conv2d_dot.supports(shape, act, encoding, instruction):
        return "int8-dot-vnni"
    popcount = target is not None and conv2d_popcount.available(target)
    if popcount and conv2d_popcount.supports(shape, act, encoding):
        return POPCOUNT
    if instruction is not None and conv2d_dot.supports(shape, act, encoding, instruction):
        return next(core for core, i in DOT_CORES.items() if i == instruction)
    return "bitplane"


def dot_instruction(target) -> DotInstruction | None:
    """The dot instruction of ``target``'s integer dot core (``None``: no dot core there)."""
    if target is None:
        return None
    return next((i for i in DOT_CORES.values() if i.available(target)), None)


def kernel_layouts(core: Core, layouts: Layouts) -> Layouts:
    """The layouts ``core`` computes in where the network around it wants ``layouts``."""
    return layouts if core in DOT_CORES else PLAIN


def ternary_storage(core: Core) -> TernaryStorage:
    """How ``core`` wants ternary weights stored: ``base3`` where a pack decodes them once at
    load time, ``bitplanes`` where the kernel decodes them in its loops."""
    return conv2d_dot.STORAGE if core in (*DOT_CORES, POPCOUNT) else "bitplanes"


def reads_activation_bytes(core: Core) -> bool:
    """Whether ``core`` can read its input as activation bytes and write its output as the
    next layer's (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`) instead of float32."""
    return core in DOT_CORES


def layer_kernels(
    core: Core,
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
) -> LayerKernels:
    """The scheduled PrimFuncs of ``core`` for this layer, with its default schedule;
    ``quantized_input``: ``x`` holds the activation bytes.

    Raises
    ------
    ValueError
        ``core`` does not compute in ``layouts`` (see :func:`kernel_layouts`) or does not read
        or write activation bytes (:func:`reads_activation_bytes`).
    """
    if kernel_layouts(core, layouts) != layouts:
        raise ValueError(f"the {core} core computes in NCHW only, not {layouts.name}")
    bytes_io = quantized_input or epilogue.quantize is not None
    if bytes_io and not reads_activation_bytes(core):
        raise ValueError(f"the {core} core reads and writes float32 activations only")
    nchw = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
    output = activation_dims(layouts.output, *nchw), epilogue.output_dtype
    if core in DOT_CORES:
        instruction = DOT_CORES[core]
        return LayerKernels(
            core,
            conv2d_dot.dot_conv2d_prim_func(
                shape, act, encoding, None, epilogue, layouts, quantized_input, instruction
            ),
            output,
            conv2d_dot.dot_pack_prim_func(shape, act, encoding, instruction),
            conv2d_dot.prepared_types(shape, act, instruction),
            conv2d_dot.PACKED_ARGUMENTS[encoding],
            layouts,
        )
    if core == POPCOUNT:
        return LayerKernels(
            core,
            conv2d_popcount.popcount_conv2d_prim_func(shape, act, encoding, None, epilogue),
            output,
            conv2d_popcount.popcount_pack_prim_func(shape, encoding),
            conv2d_popcount.prepared_types(shape),
            conv2d_popcount.PACKED_ARGUMENTS,
        )
    return LayerKernels(core, conv2d_prim_func(shape, act, encoding, epilogue=epilogue), output)


@dataclass(frozen=True)
class BuiltLayer:
    """One layer's kernel built for a target, with its weights packed (see :func:`build_layer`).

    Call it with an NCHW input (float32, or activation bytes for a kernel that reads them) and
    the epilogue's NCHW residual, if any, to get the NCHW output, whatever the kernel's layout;
    :meth:`arguments` gives the kernel's full argument list for timing ``module["main"]``.
    """

    module: tvm.runtime.Module
    constants: tuple
    output: TensorSpec
    layouts: Layouts = PLAIN

    def arguments(self, x: np.ndarray, *residual: np.ndarray) -> list:
        """``x``, the prepared and stored arguments, ``residual`` (both NCHW, passed in the
        kernel's layouts) and a fresh output tensor."""
        image = _tensor(to_layout(x, self.layouts.input))
        residual = [_tensor(to_layout(r, self.layouts.output)) for r in residual]
        return [image, *self.constants, *residual, _empty(*self.output)]

    def __call__(self, x: np.ndarray, *residual: np.ndarray) -> np.ndarray:
        arguments = self.arguments(x, *residual)
        self.module["main"](*arguments)
        return from_layout(arguments[-1].numpy(), self.layouts.output)


def build_layer(kernels: LayerKernels, stored: Sequence[np.ndarray], target) -> BuiltLayer:
    """Build one layer's kernels for ``target`` and run its pack on ``stored`` once.

    For tests and per-layer benchmarks; whole networks run the same PrimFuncs through the
    Relax VM (the packs in the module's ``prepare`` function).
    """
    stored = [_tensor(array) for array in stored]
    prepared = []
    with target:
        if kernels.pack is not None:
            pack = tvm.compile(tvm.IRModule({"main": kernels.pack}), target=target)
            prepared = [_empty(*spec) for spec in kernels.prepared]
            pack(*stored[: kernels.packed_arguments], *prepared)
        layer = tvm.compile(tvm.IRModule({"main": kernels.layer}), target=target).jit()
    constants = (*prepared, *stored[kernels.packed_arguments :])
    return BuiltLayer(layer, constants, kernels.output, kernels.layouts)


def _tensor(array: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(array))


def _empty(shape: tuple[int, ...], dtype: str):
    return tvm.runtime.tensor(np.zeros(shape, dtype))
