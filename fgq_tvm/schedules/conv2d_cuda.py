"""Quantized conv2d and dense on NVIDIA GPUs: compute, schedule, knobs.

Two cores, for a ``cuda`` target (:func:`is_cuda`):

* ``int8-gemm-cuda``, the integer weight encodings (``ternary_int8_scales``: ``w = t *
  alpha_q``; its asymmetric form; ``int8``): the layer as an implicit GEMM of int8 operands on
  the tensor cores, exact in int32, activations in NHWC:

  1. the **pack** (:func:`gemm_pack_compute`), run once on the GPU when the module is loaded
     (the module's ``prepare``): the stored weights (ternary in base 3, five to a byte, with
     their int8 scales; or int8) decoded into ``wgemm [N, K]`` int8 (row ``n``: the weights of
     filter ``n`` by kernel row, kernel column, then channel), and ``offset_sums[n] = -offset *
     sum w[n]``;
  2. the **layer** (:func:`gemm_conv2d_compute`), per inference: ``a[m, j]``, the im2col
     matrix of the activation bytes (``m``: batch, output row and column; ``j``: kernel
     position then channel, so neighbouring elements of a row are neighbouring bytes of one
     pixel of the NHWC input), read as the previous kernel wrote them or quantized here from
     the float32 input: a byte ``q`` stored with the quantizer's offset
     (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`, value ``q - offset``) as it is, padding
     the byte ``offset`` (the value 0); so ``sum w * (q - offset) = sum w * a + offset_sums``
     exactly. ``acc[m, n] = sum_j a[m, j] * wgemm[n, j]`` in int32, then ``y =
     f32(f64(acc + offset_sums) * f64(out_scale[n])) + bias`` and the epilogue (residual add,
     ReLU, the next layer's quantization), stored NHWC: ``acc``'s row ``m`` is pixel ``m`` of
     the output. ``M``, ``N`` and ``K`` are padded to whole tensor-core tiles.

  Schedule and knobs: :mod:`~fgq_tvm.schedules.tensor_core_gemm` (ldmatrix and ``mma.sync``
  int8, the im2col computed in the copy to shared memory, the epilogue beside the
  accumulators), applied as the first of the GPU rules (:mod:`~fgq_tvm.schedules.gpu_rules`);

  It needs ``sm_80`` or newer (:data:`GEMM_ARCH`);

* ``bitplane-cuda``, every other layer (ternary weights with float group scales, and every
  layer on ``sm_75``): the bitplane core's compute
  (:func:`~fgq_tvm.schedules.conv2d.conv2d_compute`, the per-group integer sums scaled in
  float64 as the reference orders them, NCHW) on GPU threads, scheduled by DLight's rules like
  the packs (one thread per output element).

Neither core is tunable yet (:attr:`~fgq_tvm.schedules.core.Core.tunable` is false; the GEMM's
knobs are :class:`~fgq_tvm.schedules.tensor_core_gemm.GemmTiles`).

NumPy reference: ``reference_forward`` of the quantized model (the arithmetic above is that of
:mod:`fgq_tvm.schedules.conv2d`). The same PrimFuncs, unscheduled, run on the CPU in the tests
(:func:`~fgq_tvm.schedules.select.build_layer` builds them as they are for an ``llvm`` target).
"""

from __future__ import annotations

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..quant.layers import ActQuant
from .conv2d import (
    ConvSchedule,
    conv2d_compute,
    dequantize,
    fused_output,
    layer_arguments,
    residual_placeholder,
)
from .conv2d import stored_activation as stored_byte
from .core import INTEGER_ENCODINGS, Conv2dShape, Core, Epilogue, LayerKernels, WeightEncoding
from .layout import NHWC, Layouts, activation_dims
from .tensor_core_gemm import TENSOR_CORE_GEMM, padded_extents

STORAGE = "base3"  # the weights are decoded once, at load time: the densest form
# the first architecture with the int8 mma.sync.m16n8k32 and cp.async the GEMM core runs on
# (sm_75, Turing, has the int8 tensor cores only as m8n8k16: its layers go to bitplane-cuda)
GEMM_ARCH = 80


def is_cuda(target) -> bool:
    """Whether ``target`` (a :class:`tvm.target.Target` or ``None``) is an NVIDIA GPU."""
    return target is not None and str(target.kind.name) == "cuda"


def arch_number(target) -> int:
    """The compute capability of a cuda ``target`` as a number: 90 for ``sm_90``."""
    return int(str(target.attrs["arch"]).removeprefix("sm_"))


def gemm_extents(shape: Conv2dShape) -> tuple[int, int, int]:
    """``M, N, K`` of the layer's GEMM: output pixels, output channels, ``R * S * C``."""
    k_h, k_w = shape.kernel
    pixels = shape.batch * shape.out_height * shape.out_width
    return pixels, shape.out_channels, k_h * k_w * shape.in_channels


def _window_element(j, shape: Conv2dShape) -> tuple:
    """``(r, s, c)`` of the GEMM's reduction index ``j = (r * S + s) * C + c``."""
    channels, k_w = shape.in_channels, shape.kernel[1]
    return j // (k_w * channels), j // channels % k_w, j % channels


def _pixel(m, shape: Conv2dShape) -> tuple:
    """``(b, oh, ow)`` of the GEMM's row ``m``."""
    rows, columns = shape.out_height, shape.out_width
    return m // (rows * columns), m // columns % rows, m % columns


def gemm_pack_compute(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> list:
    """TE compute of the load-time pack: ``[*stored weights, wgemm, offset_sums]``.

    ``wgemm`` has the GEMM's padded extents ``[N, K]`` (:func:`padded_extents`), zero outside
    the layer's. The stored weights are all the weights of
    :func:`~fgq_tvm.schedules.conv2d.layer_arguments` in :data:`STORAGE` (the weight and its
    int8 scales: the layer reads only ``out_scale`` and ``bias`` as they are stored).
    """
    args = layer_arguments(shape, encoding, STORAGE)
    extents = gemm_extents(shape)
    _, n, k = extents

    def weight(row, j):
        r, s, c = _window_element(tirx.min(j, k - 1), shape)
        return args.integer_weight(r, s, c, tirx.min(row, n - 1))

    def padded_weight(row, j):
        inside = tirx.all(row < n, j < k)
        return tirx.if_then_else(inside, weight(row, j), 0).astype("int8")

    _, padded_n, padded_k = padded_extents(*extents)
    wgemm = te.compute((padded_n, padded_k), padded_weight, name="wgemm")
    j = te.reduce_axis((0, k), name="j")
    offset_sums = te.compute(
        (n,), lambda row: te.sum(weight(row, j) * -act.offset, axis=j), name="offset_sums"
    )
    return [*args.weights, wgemm, offset_sums]


def gemm_conv2d_compute(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue,
    quantized_input: bool = False,
) -> list:
    """TE compute of the layer on ``int8-gemm-cuda``; returns its arguments, output last:
    ``x, wgemm, offset_sums, out_scale, bias[, residual], y`` (``x`` float32, or with
    ``quantized_input`` the activation bytes; ``y`` float32, or bytes when the epilogue
    quantizes; all NHWC, ``y`` as its ``[pixels, channels]`` matrix: see
    :func:`gemm_conv2d_prim_func`)."""
    nhwc = (shape.batch, shape.height, shape.width, shape.in_channels)
    x = te.placeholder(nhwc, "uint8" if quantized_input else "float32", name="x")
    m, n, k = padded_extents(*gemm_extents(shape))
    wgemm = te.placeholder((n, k), "int8", name="wgemm")
    offset_sums = te.placeholder((shape.out_channels,), "int32", name="offset_sums")
    out_scale = te.placeholder((shape.out_channels,), name="out_scale")
    bias = te.placeholder((shape.out_channels,), name="bias")
    a = _im2col(x, shape, act)
    j = te.reduce_axis((0, k), name="j")
    acc = te.compute(
        (m, n),
        lambda row, column: te.sum(
            a[row, j].astype("int32") * wgemm[column, j].astype("int32"), axis=j
        ),
        name="acc",
    )

    def value(b, channel, oh, ow):
        row = (b * shape.out_height + oh) * shape.out_width + ow
        exact = acc[row, channel] + offset_sums[channel]
        return dequantize(exact, out_scale[channel]) + bias[channel]

    residual = residual_placeholder(shape, epilogue, NHWC)
    output = fused_output(value, epilogue, residual, NHWC)
    pixels, channels, _ = gemm_extents(shape)
    y = te.compute((pixels, channels), lambda row, k: output(*_nchw(row, k, shape)), name="y")
    return [
        x,
        wgemm,
        offset_sums,
        out_scale,
        bias,
        *([residual] if residual is not None else []),
        y,
    ]


def _nchw(row, channel, shape: Conv2dShape) -> tuple:
    """``(b, k, oh, ow)`` of the output element in GEMM row ``row`` and column ``channel``."""
    b, oh, ow = _pixel(row, shape)
    return b, channel, oh, ow


def gemm_conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue,
    quantized_input: bool = False,
) -> tvm.tirx.PrimFunc:
    """The layer's PrimFunc, unscheduled: :func:`gemm_conv2d_compute` with ``y`` given its NHWC
    shape (its elements still computed one per GEMM element, so that the schedule keeps the
    epilogue beside the accumulators), marked for the tensor-core schedule
    (:class:`~fgq_tvm.schedules.tensor_core_gemm.TensorCoreGemm`)."""
    func = te.create_prim_func(gemm_conv2d_compute(shape, act, encoding, epilogue, quantized_input))
    sch = Schedule(func)
    sch.transform_layout(sch.get_sblock("y"), ("write", 0), lambda row, k: (*_pixel(row, shape), k))
    return sch.mod["main"].with_attr(TENSOR_CORE_GEMM, True)


def _im2col(x: te.Tensor, shape: Conv2dShape, act: ActQuant) -> te.Tensor:
    """``a[m, j]``: the activation byte of the NHWC input at output pixel ``m``'s window
    element ``j`` (:func:`_window_element`); padding holds the value 0 (the byte ``offset``).
    Rows beyond the GEMM's (:func:`padded_extents`) repeat its last row, and are never
    stored; columns beyond it read column ``j mod K`` (``wgemm`` is zero on them): so a vector
    of them is still a run of one pixel's channels, which the copy loads whole."""
    (pad_h, pad_w), (stride_h, stride_w) = shape.padding, shape.stride
    dil_h, dil_w = shape.dilation
    extents = gemm_extents(shape)
    pixels, _, size = extents

    def element(m, j):
        b, oh, ow = _pixel(tirx.min(m, pixels - 1), shape)
        r, s, c = _window_element(j % size, shape)
        h = oh * stride_h + r * dil_h - pad_h
        w = ow * stride_w + s * dil_w - pad_w
        inside = tirx.all(h >= 0, h < shape.height, w >= 0, w < shape.width)
        row = tirx.max(tirx.min(h, shape.height - 1), 0)
        clamped = x[b, row, tirx.max(tirx.min(w, shape.width - 1), 0), c]
        stored = clamped if x.dtype == "uint8" else stored_byte(clamped, act)
        return tirx.if_then_else(inside, stored, tirx.const(act.offset, "uint8"))

    padded_m, _, padded_k = padded_extents(*extents)
    return te.compute((padded_m, padded_k), element, name="a")


class GemmCudaCore(Core):
    """``int8-gemm-cuda``: integer layers as implicit int8 GEMMs (see the module docstring)."""

    name = "int8-gemm-cuda"
    ternary_storage = STORAGE
    layouts = (NHWC,)
    activation_bytes = True
    rule_scheduled = True

    def available(self, target) -> bool:
        return is_cuda(target) and arch_number(target) >= GEMM_ARCH

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return encoding in INTEGER_ENCODINGS

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        layer = gemm_conv2d_prim_func(shape, act, encoding, epilogue, quantized_input)
        pack_tensors = gemm_pack_compute(shape, act, encoding)
        pack = te.create_prim_func(pack_tensors)
        _, n, k = padded_extents(*gemm_extents(shape))
        prepared = (((n, k), "int8"), ((shape.out_channels,), "int32"))
        return LayerKernels(
            self.name,
            layer,
            (activation_dims(NHWC, *shape.output_dims), epilogue.output_dtype),
            pack,
            prepared,
            len(pack_tensors) - len(prepared),
            layouts,
        )


class BitplaneCudaCore(Core):
    """``bitplane-cuda``: the bitplane core's compute on GPU threads, for the layers the GEMM
    core does not compute (see the module docstring)."""

    name = "bitplane-cuda"
    rule_scheduled = True

    def available(self, target) -> bool:
        return is_cuda(target)

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return True

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        whole_width = ConvSchedule("channels")  # computes exactly the output's columns
        compute = conv2d_compute(shape, act, encoding, whole_width, epilogue)
        layer = te.create_prim_func(compute)
        return LayerKernels(self.name, layer, (shape.output_dims, epilogue.output_dtype))


GEMM_CUDA_CORE = GemmCudaCore()
BITPLANE_CUDA_CORE = BitplaneCudaCore()
