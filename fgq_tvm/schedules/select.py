"""Which core computes a layer on a target, and its scheduled PrimFuncs.

Cores:

* ``int8-dot-vnni`` (:mod:`~fgq_tvm.schedules.conv2d_vnni`): integer weights (int8 layers, or
  ternary with int8 group scales), and ternary weights with float scales in groups of a multiple
  of 4 channels on unsigned activations, on a target with AVX-512 VNNI. Its weights are packed
  into the dot core's int8 layout once, when the module is loaded (the ``pack`` PrimFunc);
* ``bitplane`` (:mod:`~fgq_tvm.schedules.conv2d`): everything else (float group scales on
  signed activations or odd group sizes, targets without VNNI); it reads the stored 2-bit
  weights directly.

Both compute the same numbers (``reference_forward``) from the layer's stored arguments
(:func:`~fgq_tvm.relax_passes.legalize_quantized_layers.kernel_arguments`, ternary weights in
the core's :func:`ternary_storage`). The int8 dot core
reads and writes its activations in either layout of :mod:`~fgq_tvm.schedules.layout`, the
bitplane core in NCHW only (:func:`kernel_layouts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tvm

from ..quant.layers import ActQuant
from . import conv2d_vnni
from .conv2d import (
    NO_EPILOGUE,
    Conv2dShape,
    Epilogue,
    TernaryStorage,
    WeightEncoding,
    conv2d_prim_func,
)
from .intrinsics_x86 import has_vnni
from .layout import PLAIN, Layouts, activation_dims, from_layout, to_layout

Core = Literal["bitplane", "int8-dot-vnni"]


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
    """The fastest exact core for this layer on ``target`` (``None``: portable default)."""
    if target is not None and has_vnni(target) and conv2d_vnni.supports(shape, act, encoding):
        return "int8-dot-vnni"
    return "bitplane"


def kernel_layouts(core: Core, layouts: Layouts) -> Layouts:
    """The layouts ``core`` computes in where the network around it wants ``layouts``."""
    return layouts if core == "int8-dot-vnni" else PLAIN


def ternary_storage(core: Core) -> TernaryStorage:
    """How ``core`` wants ternary weights stored: ``base3`` where a pack decodes them once at
    load time, ``bitplanes`` where the kernel decodes them in its loops."""
    return conv2d_vnni.STORAGE if core == "int8-dot-vnni" else "bitplanes"


def reads_activation_bytes(core: Core) -> bool:
    """Whether ``core`` can read its input as activation bytes and write its output as the
    next layer's (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`) instead of float32."""
    return core == "int8-dot-vnni"


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
    if core == "int8-dot-vnni":
        return LayerKernels(
            core,
            conv2d_vnni.vnni_conv2d_prim_func(
                shape, act, encoding, None, epilogue, layouts, quantized_input
            ),
            output,
            conv2d_vnni.vnni_pack_prim_func(shape, act, encoding),
            conv2d_vnni.prepared_types(shape, act),
            conv2d_vnni.PACKED_ARGUMENTS[encoding],
            layouts,
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
