"""The kernel interface: what a quantized layer asks of a core, and what every core implements.

A layer hands a kernel its geometry (:class:`Conv2dShape`), its activation quantizer
(:class:`~fgq_tvm.quant.layers.ActQuant`), its weight encoding (:data:`WeightEncoding`), the
elementwise work fused after it (:class:`Epilogue`), the layouts around it and whether its input
holds activation bytes; a core answers with :class:`LayerKernels`.

A core is a rule in the ordered list of :mod:`~fgq_tvm.schedules.select`: the first core that
the target has (:meth:`Core.available`) and that computes the layer (:meth:`Core.supports`)
computes it. A core states, in its own module beside its compute and schedule:

* what it needs and computes: :meth:`~Core.available`, :meth:`~Core.supports`;
* how it wants the layer's constants (:attr:`~Core.ternary_storage`) and what it reads and
  writes (:attr:`~Core.layouts`, :attr:`~Core.activation_bytes`);
* its PrimFuncs with their default schedule and load-time pack (:meth:`~Core.layer_kernels`,
  which :meth:`~Core.kernels` calls once the request is one the core computes);
* its tuning knobs, where MetaSchedule may search them (:attr:`~Core.tunable`,
  :meth:`~Core.workload`, :meth:`~Core.schedule`).

Every core computes the numbers of ``reference_forward`` (DESIGN.md, "The arithmetic") from the
same stored arguments (:func:`~fgq_tvm.schedules.kernel_spec.kernel_arguments`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from ..quant.layers import ActQuant
from .layout import NCHW, PLAIN, ActivationLayout, Layouts

if TYPE_CHECKING:
    import tvm
    from tvm.s_tir import Schedule

WeightEncoding = Literal[
    "ternary_group_scales", "ternary_int8_scales", "ternary_asymmetric_int8_scales", "int8"
]
# the encodings whose weight is one int8 value (t * alpha_q, or the int8 weight)
INTEGER_ENCODINGS = ("ternary_int8_scales", "ternary_asymmetric_int8_scales", "int8")
TernaryStorage = Literal["bitplanes", "base3"]
TensorSpec = tuple[tuple[int, ...], str]  # (shape, dtype)
SCHEDULED = "tirx.is_scheduled"  # the mark of a scheduled PrimFunc, as DLight reads and sets it


def is_scheduled(func: tvm.tirx.PrimFunc) -> bool:
    """Whether ``func`` carries the mark of a scheduled PrimFunc (:data:`SCHEDULED`)."""
    attrs = func.attrs if func.attrs is not None else {}
    return bool(attrs.get(SCHEDULED, False))


@dataclass(frozen=True)
class Conv2dShape:
    """The geometry of one quantized conv2d (dense: a 1x1 conv on a 1x1 input)."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    group_size: int = 1

    @property
    def out_height(self) -> int:
        extent = self.dilation[0] * (self.kernel[0] - 1) + 1
        return (self.height + 2 * self.padding[0] - extent) // self.stride[0] + 1

    @property
    def out_width(self) -> int:
        extent = self.dilation[1] * (self.kernel[1] - 1) + 1
        return (self.width + 2 * self.padding[1] - extent) // self.stride[1] + 1

    @property
    def output_dims(self) -> tuple[int, int, int, int]:
        """The NCHW shape of the output."""
        return self.batch, self.out_channels, self.out_height, self.out_width

    @property
    def num_groups(self) -> int:
        return -(-self.in_channels // self.group_size)

    @property
    def padded_channels(self) -> int:
        """Input channels rounded up to whole groups (the padding channels are zero)."""
        return self.num_groups * self.group_size

    @property
    def is_dense(self) -> bool:
        return self.height == self.width == self.kernel[0] == self.kernel[1] == 1

    @property
    def macs(self) -> int:
        k_h, k_w = self.kernel
        per_output = self.in_channels * k_h * k_w
        return self.batch * self.out_channels * self.out_height * self.out_width * per_output


@dataclass(frozen=True)
class Epilogue:
    """Elementwise work fused after a layer's float output ``y = conv(x) + bias``.

    ``y + residual`` (a float32 tensor of the output's shape) when ``residual``, then
    ``max(y, 0)`` when ``relu``: the float32 operations of ``relu(conv(x) + residual)`` in the
    reference, in the same order, so the result is bit-identical. With ``quantize`` (the next
    layer's quantizer) the output is then stored as that layer's activation bytes
    (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`), the quantize stage that layer would run.
    """

    residual: bool = False
    relu: bool = False
    quantize: ActQuant | None = None

    @property
    def name(self) -> str:
        """``add``, ``relu``, ``quantize`` joined by ``_``, or empty (:meth:`parse` reads it
        back)."""
        parts = ["add"] * self.residual + ["relu"] * self.relu
        return "_".join(parts + ["quantize"] * (self.quantize is not None))

    @property
    def output_dtype(self) -> str:
        return "float32" if self.quantize is None else "uint8"

    @staticmethod
    def parse(name: str, quantize: ActQuant | None = None) -> Epilogue:
        """The epilogue called ``name`` (see :attr:`name`); ``quantize`` is its quantizer when
        the name ends in ``quantize``."""
        parts = set(name.split("_")) - {""}
        if not parts <= {"add", "relu", "quantize"} or ("quantize" in parts) != bool(quantize):
            raise ValueError(f"unknown epilogue {name!r} (quantizer: {quantize})")
        return Epilogue("add" in parts, "relu" in parts, quantize)

    def reference(self, y: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """NumPy reference: the same operations on the layer's float32 output ``y``."""
        if self.residual:
            y = y + residual
        if self.relu:
            y = np.maximum(y, np.float32(0))
        return y if self.quantize is None else self.quantize.stored(y)


NO_EPILOGUE = Epilogue()


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
    (:attr:`Core.activation_bytes`).
    """

    core: str
    layer: tvm.tirx.PrimFunc
    output: TensorSpec
    pack: tvm.tirx.PrimFunc | None = None
    prepared: tuple[TensorSpec, ...] = ()
    packed_arguments: int = 0
    layouts: Layouts = PLAIN


class Core(ABC):
    """One core: a way to compute quantized conv2d and dense layers on some targets.

    Attributes
    ----------
    name
        Printed in the compile summary, recorded in the kernels' ``fgq.core`` attribute and the
        sidecar.
    ternary_storage
        How the core wants ternary weights stored: ``base3`` where a pack decodes them once at
        load time, ``bitplanes`` where the kernel decodes them in its loops.
    layouts
        The activation layouts the core reads and writes (:mod:`~fgq_tvm.schedules.layout`);
        the last is the one the network keeps between layers on a target with this core
        (:func:`~fgq_tvm.schedules.select.network_layout`).
    activation_bytes
        Whether the core can read its input as activation bytes and write its output as the
        next layer's (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`) instead of float32.
    tunable
        Whether :meth:`workload` and :meth:`schedule` define a space MetaSchedule searches.
    rule_scheduled
        Whether the core leaves its PrimFuncs unscheduled for the target's default rules
        (:mod:`~fgq_tvm.schedules.gpu_rules`), applied once the graph passes are done.
    """

    name: str
    ternary_storage: TernaryStorage = "bitplanes"
    layouts: tuple[ActivationLayout, ...] = (NCHW,)
    activation_bytes: bool = False
    tunable: bool = False
    rule_scheduled: bool = False

    @abstractmethod
    def available(self, target) -> bool:
        """Whether ``target`` (a :class:`tvm.target.Target`, or ``None`` for the portable
        default) has the instructions this core needs."""

    @abstractmethod
    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        """Whether this core computes a layer of this geometry, activation quantizer and
        weight encoding exactly."""

    def kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue | None = None,
        layouts: Layouts = PLAIN,
        quantized_input: bool = False,
    ) -> LayerKernels:
        """The layer's PrimFuncs with this core's default schedule.

        Parameters
        ----------
        shape, act, encoding
            The layer's geometry, activation quantizer and weight encoding (one the core
            :meth:`supports`).
        epilogue
            What the kernel does after the layer (``None``: nothing).
        layouts
            The layouts of ``x``, and of the residual and ``y``: one the core computes in
            (:meth:`layouts_for`).
        quantized_input
            ``x`` holds the activation bytes instead of float32 values.

        Raises
        ------
        ValueError
            The core does not compute in ``layouts``, or bytes are asked of a core without
            :attr:`activation_bytes`.
        """
        epilogue = epilogue or NO_EPILOGUE
        if self.layouts_for(layouts) != layouts:
            computed = " and ".join(self.layouts)
            problem = f"computes in {computed} only, not {layouts.name}"
            raise ValueError(f"the {self.name} core {problem}")
        if (quantized_input or epilogue.quantize is not None) and not self.activation_bytes:
            raise ValueError(f"the {self.name} core reads and writes float32 activations only")
        return self.layer_kernels(shape, act, encoding, epilogue, layouts, quantized_input)

    @abstractmethod
    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        """The compute and default schedule of :meth:`kernels`, for a request the core
        computes."""

    def layouts_for(self, wanted: Layouts) -> Layouts:
        """The layouts this core computes in where the network around it wants ``wanted``:
        those, if the core has them, else its :attr:`layouts`' last."""
        if {wanted.input, wanted.output} <= set(self.layouts):
            return wanted
        return Layouts(self.layouts[-1], self.layouts[-1])

    def workload(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> tvm.tirx.PrimFunc:
        """The unscheduled kernel PrimFunc: what tuning records are keyed by (tunable cores)."""
        raise NotImplementedError(f"the {self.name} core has no tuning space")

    def schedule(self, sch: Schedule) -> list[Schedule] | None:
        """The design space MetaSchedule searches (tunable cores): ``sch``, a :meth:`workload`,
        scheduled in place with the tuning knobs sampled, or the schedules of several spaces
        (copies of ``sch``) where a knob is not a decision a trace can replay with another
        value."""
        raise NotImplementedError(f"the {self.name} core has no tuning space")

    def __repr__(self) -> str:
        return f"<core {self.name}>"
