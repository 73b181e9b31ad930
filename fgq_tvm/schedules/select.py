"""Which core computes a layer on a target: the ordered list of cores, and building one layer.

Each core is a plug-in (:class:`~fgq_tvm.schedules.core.Core`) in its own module; :data:`CORES`
lists them in order of preference, and a layer goes to the first one that the target has and
that computes it (:func:`select_core`):

* the integer dot cores (:mod:`~fgq_tvm.schedules.conv2d_dot`): ``int8-dot-vnni`` on a target
  with AVX-512 VNNI, else ``int16-dot-avx2`` on one with AVX2. They compute integer weights
  (int8 layers, or ternary with int8 group scales), and ternary weights with float scales in
  groups of a multiple of their word (4 or 2 channels) on unsigned activations. Their weights
  are packed into the dot instruction's layout once, when the module is loaded;
* ``popcount-vpopcntdq`` (:mod:`~fgq_tvm.schedules.conv2d_popcount`): ternary weights with
  one scale per group (not asymmetric ones, which go to a dot core) in groups of whole
  64-channel words on unsigned activations of at most 4 bits, on a target with AVX-512
  VPOPCNTDQ (where VNNI is there too, its dot core takes every such layer first: 2.8-6.1x
  faster on every such ResNet-18 layer, 4-bit activations, N=64; without it, the popcount core
  takes 0.93x the AVX2 dot core's time over those layers,
  ``benchmarks/results/popcount-core-resnet18.md``);
* ``bitplane`` (:mod:`~fgq_tvm.schedules.conv2d`): everything else on a CPU (float group
  scales on signed activations or odd group sizes, targets without AVX2); it reads the stored
  2-bit weights directly;
* on an NVIDIA GPU (:mod:`~fgq_tvm.schedules.conv2d_cuda`), ``int8-gemm-cuda`` for the integer
  weight encodings (implicit int8 GEMMs on the tensor cores, NHWC), and ``bitplane-cuda`` for
  the rest. Their PrimFuncs are scheduled by the GPU rules
  (:mod:`~fgq_tvm.schedules.gpu_rules`).

All compute the same numbers (``reference_forward``) from the layer's stored arguments
(:func:`~fgq_tvm.schedules.kernel_spec.kernel_arguments`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tvm

from ..quant.layers import ActQuant
from ..remote import LOCAL, Session
from .conv2d import BITPLANE_CORE
from .conv2d_cuda import BITPLANE_CUDA_CORE, GEMM_CUDA_CORE, is_cuda
from .conv2d_dot import AVX2_CORE, VNNI_CORE
from .conv2d_popcount import POPCOUNT_CORE
from .core import Conv2dShape, Core, LayerKernels, TensorSpec, WeightEncoding
from .cuda_pipeline import cuda_tir_pipeline
from .gpu_rules import schedule_for_gpu
from .layout import NCHW, PLAIN, ActivationLayout, Layouts, from_layout, to_layout

CORES: tuple[Core, ...] = (
    GEMM_CUDA_CORE,
    BITPLANE_CUDA_CORE,
    VNNI_CORE,
    POPCOUNT_CORE,
    AVX2_CORE,
    BITPLANE_CORE,
)


def core_named(name: str) -> Core:
    """The core of :data:`CORES` called ``name``.

    Raises
    ------
    ValueError
        No core has that name.
    """
    for core in CORES:
        if core.name == name:
            return core
    raise ValueError(f"no core is named {name!r}: the cores are {', '.join(c.name for c in CORES)}")


def select_core(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    target,
    cores: Sequence[Core] | None = None,
    measured: Mapping[str, str] | None = None,
) -> str:
    """The name of the core that computes this layer on ``target`` (``None``: the portable
    default): the first of ``cores`` (default: :data:`CORES`, as it is at the call) that the
    target has and that computes the layer, unless ``measured`` (:func:`layer_key` to a core
    name, the fastest ``fgq-tvm tune`` timed: :mod:`fgq_tvm.core_choices`) names another of
    its :func:`interchangeable_cores`.

    Raises
    ------
    ValueError
        None of ``cores`` does (:data:`CORES` ends with one that computes every layer).
    """
    candidates = interchangeable_cores(shape, act, encoding, target, cores)
    chosen = (measured or {}).get(layer_key(shape, act, encoding))
    return chosen if chosen in candidates else candidates[0]


def interchangeable_cores(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    target,
    cores: Sequence[Core] | None = None,
) -> list[str]:
    """The first of ``cores`` (default: :data:`CORES`) that ``target`` has and that computes
    this layer, then the others that could take its place: they too are on the target and
    compute the layer, in the same layouts, reading and writing activation bytes alike (the
    graph around the layer stays the same).

    Raises
    ------
    ValueError
        None of ``cores`` computes the layer on ``target``.
    """
    able = [
        core
        for core in (CORES if cores is None else cores)
        if core.available(target) and core.supports(shape, act, encoding)
    ]
    if not able:
        raise ValueError(f"no core computes {encoding} weights of {shape} with {act.name}")
    first = able[0]
    return [
        core.name
        for core in able
        if core.layouts == first.layouts and core.activation_bytes == first.activation_bytes
    ]


def layer_key(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> str:
    """How measured core choices name a layer: its geometry, activation quantizer (bits and
    sign: the scale does not change a kernel's speed) and weight encoding."""
    sign = "signed" if act.signed else "unsigned"
    return f"{shape} {act.bits}-bit {sign} {encoding}"


def network_layout(target) -> ActivationLayout:
    """The layout activations keep between conv layers on ``target``: the network layout of
    the first core ``target`` has that computes in another than NCHW (NCHW16c on the x86 dot
    cores, NHWC on the GPU), else NCHW."""
    for core in CORES:
        if core.layouts[-1] != NCHW and core.available(target):
            return core.layouts[-1]
    return NCHW


@dataclass(frozen=True)
class BuiltLayer:
    """One layer's kernel built for a target, with its weights packed (see :func:`build_layer`).

    Call it with an NCHW input (float32, or activation bytes for a kernel that reads them) and
    the epilogue's NCHW residual, if any, to get the NCHW output, whatever the kernel's layout;
    :meth:`arguments` gives the kernel's full argument list for timing ``module["main"]``.
    ``session`` is where it runs (:mod:`fgq_tvm.remote`).
    """

    module: tvm.runtime.Module
    constants: tuple
    output: TensorSpec
    layouts: Layouts = PLAIN
    session: Session = LOCAL

    def arguments(self, x: np.ndarray, *residual: np.ndarray) -> list:
        """``x``, the prepared and stored arguments, ``residual`` (both NCHW, passed in the
        kernel's layouts) and a fresh output tensor."""
        image = self.session.tensor(to_layout(x, self.layouts.input))
        residual = [self.session.tensor(to_layout(r, self.layouts.output)) for r in residual]
        return [image, *self.constants, *residual, _empty(self.session, *self.output)]

    def __call__(self, x: np.ndarray, *residual: np.ndarray) -> np.ndarray:
        arguments = self.arguments(x, *residual)
        self.module["main"](*arguments)
        return from_layout(arguments[-1].numpy(), self.layouts.output)


def build_layer(
    kernels: LayerKernels, stored: Sequence[np.ndarray], target, session: Session = LOCAL
) -> BuiltLayer:
    """Build one layer's kernels for ``target``, load them on ``session`` (this process, or a
    remote device: :mod:`fgq_tvm.remote`) and run its pack on ``stored`` there once.

    For tests, tuning and per-layer benchmarks; whole networks run the same PrimFuncs through
    the Relax VM (the packs in the module's ``prepare`` function).
    """
    stored = [session.tensor(array) for array in stored]
    prepared = []
    with target:
        if kernels.pack is not None:
            pack = session.load(_compile(kernels.pack, kernels.core, target))
            prepared = [_empty(session, *spec) for spec in kernels.prepared]
            pack["main"](*stored[: kernels.packed_arguments], *prepared)
        layer = session.load(_compile(kernels.layer, kernels.core, target))
    constants = (*prepared, *stored[kernels.packed_arguments :])
    return BuiltLayer(layer, constants, kernels.output, kernels.layouts, session)


def _compile(func: tvm.tirx.PrimFunc, core: str, target):
    """Build one PrimFunc of ``core`` for ``target``: scheduled by the GPU rules where the core
    leaves its schedule to them; built as it is (plain loops) on a CPU, to check the
    arithmetic of a GPU core there."""
    mod = tvm.IRModule({"main": func})
    if not is_cuda(target):
        return tvm.compile(mod, target=target)
    if core_named(core).rule_scheduled:
        mod = schedule_for_gpu(mod, target)
    return tvm.compile(mod, target=target, tir_pipeline=cuda_tir_pipeline())


def _empty(session: Session, shape: tuple[int, ...], dtype: str):
    return session.tensor(np.zeros(shape, dtype))
