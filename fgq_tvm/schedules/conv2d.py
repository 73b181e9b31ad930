"""Quantized conv2d and dense kernels: compute, schedule, tuning knobs and reference side by side.

One PrimFunc computes one layer from its float32 input to its float32 output:

1. ``xq``: quantize and zero-pad the input, ``clamp(round(x / s_x), qmin, qmax)``;
2. ``wdec``: decode the packed weights into a ``[R, S, C, K]`` scratch tensor once per call (or,
   for dense layers, inline in the inner loop, where each weight is used once);
3. the reduction, in one of two forms (DESIGN.md, "The arithmetic"):

   * ``group_scales`` (ternary weights, float scales): the bitplane add/subtract core. For each
     group ``g`` of ``N`` input channels at kernel position ``(r, s)``,
     ``psum = sum_{c in g} t[k, c, r, s] * xq[c, ...]`` is an exact integer (held in float32:
     ``|psum| <= 64 * 255 < 2^24``), then ``acc += f64(alpha[k, g, r, s]) * psum`` in float64
     and ``y = f32(acc * s_x) + bias``;
   * ``integer`` (ternary weights with int8 scales, ``w = t * alpha_q``, where asymmetric
     scales give ``t = 1`` and ``t = -1`` their own ``alpha_q``; or 8-bit weights):
     ``acc = sum w * xq`` in int32 and ``y = f32(f64(acc) * f64(out_scale[k])) + bias`` (the
     product in float64, so no fused multiply-add can change the float32 rounding).

Ternary weights are stored in one of two forms (:data:`TernaryStorage`), then the scales
``[R, S, G, K]``; 8-bit layers pass their int8 weights as ``[R, S, C, K]``:

* ``bitplanes``: ``plus`` and ``minus`` (uint32 ``[R, S, W, K]``, bit ``c % 32`` of word
  ``c // 32``: 2 bits per weight), which this core decodes in its loops;
* ``base3``: ``trits`` (uint8 ``[R, S, ceil(C/5), K]``, byte ``c // 5`` holds
  ``sum_j (t + 1) * 3^j`` over the channels ``5 (c // 5) + j``: 1.6 bits per weight), the
  densest form, for cores that decode the weights once, at load time.

Output channels innermost, so that the decode stage runs on whole vectors
(:func:`to_kernel_layout` transposes ``[K, C, R, S]``).

Schedule (:class:`ConvSchedule`): a register tile of partial sums with the reduction loops
outside it and the (batch, channel block) loop in parallel. Wide layers vectorise over output
columns (``vector_axis="width"``: ``out_channel_tile`` channels x one vector of columns; the row
is padded up to whole vectors, so every vector is full); narrow layers and dense layers vectorise
over output channels (``vector_axis="channels"``: all columns of a row x one vector of channels,
whose weights and scales are contiguous in the ``[R, S, C, K]`` layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..quant.layers import ActQuant
from .core import (
    NO_EPILOGUE,
    Conv2dShape,
    Core,
    Epilogue,
    LayerKernels,
    TernaryStorage,
    WeightEncoding,
)
from .layout import (
    CHANNEL_BLOCK,
    NCHW,
    ActivationLayout,
    Layouts,
    activation_dims,
    activation_placeholder,
    element,
)

ASYMMETRIC = "ternary_asymmetric_int8_scales"  # int8 scales, one per sign and group
WORD_BITS = 32
TRITS_PER_BYTE = 5  # 3^5 = 243 values fit a byte
MIN_DECODE_REUSE = 8  # output positions per weight from which decoding once pays off


@dataclass(frozen=True)
class ConvSchedule:
    """Tuning knobs of the default schedule.

    Attributes
    ----------
    vector_axis
        ``"width"`` (output columns in vector lanes) or ``"channels"`` (output channels).
    lanes
        Vector lanes (int32/float32 elements).
    out_channel_tile
        ``vector_axis="width"`` only: output channels computed together (unrolled).
    decode_once
        Decode the packed weights into a scratch tensor once per call (worth it when each
        weight is used at many output positions), or inside the inner loop (dense layers).
    """

    vector_axis: Literal["width", "channels"] = "width"
    lanes: int = 16
    out_channel_tile: int = 8
    decode_once: bool = True

    @staticmethod
    def default_for(shape: Conv2dShape) -> ConvSchedule:
        """A schedule that needs no tuning: full vectors on the axis that fills them best."""
        reuse = shape.batch * shape.out_height * shape.out_width
        if shape.out_width <= 16 and shape.out_channels % 16 == 0 or shape.is_dense:
            return ConvSchedule("channels", lanes=16, decode_once=reuse >= MIN_DECODE_REUSE)
        tile = next(t for t in (8, 4, 2, 1) if shape.out_channels % t == 0)
        return ConvSchedule("width", 16 if shape.out_width > 8 else 8, tile)

    def padded_out_width(self, shape: Conv2dShape) -> int:
        """Output columns the kernel computes: whole vectors when vectorising the width."""
        if self.vector_axis == "channels":
            return shape.out_width
        return -(-shape.out_width // self.lanes) * self.lanes


# --------------------------------------------------------------------------------------------
# Weight packing (NumPy, at compile time)
# --------------------------------------------------------------------------------------------


def to_kernel_layout(per_channel: np.ndarray) -> np.ndarray:
    """``[K, C, R, S]`` (or ``[K, G, R, S]``) to the kernels' ``[R, S, C, K]`` layout."""
    return np.ascontiguousarray(per_channel.transpose(2, 3, 1, 0))


def pack_bitplanes(ternary: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack ternary ``[K, C, R, S]`` weights into ``plus`` and ``minus`` uint32 ``[R, S, W, K]``.

    Channels are padded with zeros up to whole groups; bit ``c % 32`` of word ``c // 32`` is set
    where ``t[k, c, r, s]`` is +1 (``plus``) or -1 (``minus``).
    """
    k, c, r, s = ternary.shape
    padded = -(-c // group_size) * group_size
    words = -(-padded // WORD_BITS)
    weights = ternary.transpose(2, 3, 0, 1)

    def plane(mask: np.ndarray) -> np.ndarray:
        bits = np.zeros((r, s, k, words * WORD_BITS), dtype=bool)
        bits[..., :c] = mask
        packed = np.packbits(bits, axis=-1, bitorder="little").view("<u4").astype(np.uint32)
        return np.ascontiguousarray(packed.transpose(0, 1, 3, 2))

    return plane(weights == 1), plane(weights == -1)


def pack_trits(ternary: np.ndarray, group_size: int) -> np.ndarray:
    """Pack ternary ``[K, C, R, S]`` weights five to a byte: uint8 ``[R, S, B, K]``.

    Byte ``b`` holds ``sum_j (t[k, 5b + j, r, s] + 1) * 3^j``; channels are padded with zeros
    up to whole groups and whole bytes.
    """
    k, c, r, s = ternary.shape
    padded = -(-c // group_size) * group_size
    count = -(-padded // TRITS_PER_BYTE)
    trits = np.ones((r, s, count * TRITS_PER_BYTE, k), dtype=np.int32)  # t = 0
    trits[:, :, :c, :] = ternary.transpose(2, 3, 1, 0).astype(np.int32) + 1
    digits = trits.reshape(r, s, count, TRITS_PER_BYTE, k)
    powers = (3 ** np.arange(TRITS_PER_BYTE)).reshape(1, 1, 1, -1, 1)
    return np.ascontiguousarray((digits * powers).sum(axis=3).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Compute
# --------------------------------------------------------------------------------------------


def _quantized_input(x: te.Tensor, shape: Conv2dShape, act: ActQuant, dtype: str, out_w: int):
    """``xq``: the input quantized, zero-padded spatially and up to whole groups of channels."""
    pad_h, pad_w = shape.padding
    height = padded_extent(shape.height, pad_h, shape.out_height, shape, axis=0)
    width = padded_extent(shape.width, pad_w, out_w, shape, axis=1)

    def quantize(b, c, h, w):
        inside = tirx.all(
            c < shape.in_channels, h >= pad_h, h < shape.height + pad_h,
            w >= pad_w, w < shape.width + pad_w,
        )  # fmt: skip
        value = x[b, tirx.min(c, shape.in_channels - 1), h - pad_h, w - pad_w]
        quantized = quantized_value(value, act).astype(dtype)
        return tirx.if_then_else(inside, quantized, tirx.const(0, dtype))

    return te.compute((shape.batch, shape.padded_channels, height, width), quantize, name="xq")


def padded_extent(size: int, pad: int, outputs: int, shape: Conv2dShape, axis: int) -> int:
    """Input extent read by ``outputs`` output positions (at least the padded input)."""
    reach = (outputs - 1) * shape.stride[axis] + shape.dilation[axis] * (shape.kernel[axis] - 1)
    return max(size + 2 * pad, reach + 1)


def decode_bit(plane: te.Tensor, k, c, r, s):
    word = plane[r, s, c // WORD_BITS, k]
    return ((word >> (c % WORD_BITS).astype("uint32")) & tirx.const(1, "uint32")).astype("int32")


def decode_trit(trits: te.Tensor, k, c, r, s):
    """``t[k, c, r, s]`` (int32) from :func:`pack_trits`' bytes."""
    byte = trits[r, s, c // TRITS_PER_BYTE, k].astype("int32")
    digit = c % TRITS_PER_BYTE
    power = tirx.const(1, "int32")
    for j in range(1, TRITS_PER_BYTE):
        power = tirx.if_then_else(digit == j, tirx.const(3**j, "int32"), power)
    return tirx.truncmod(tirx.truncdiv(byte, power), 3) - 1


@dataclass(frozen=True)
class LayerArguments:
    """The placeholders of a layer's kernel (either core) and how to read its weights.

    ``weights`` is ``(w,)`` for int8 layers; for ternary layers ``(plus, minus, *scales)``
    (``storage="bitplanes"``) or ``(trits, *scales)`` (``"base3"``), where ``scales`` is
    ``(alpha,)``, or ``(alpha_q, negative_q)`` for the asymmetric encoding.
    """

    shape: Conv2dShape
    encoding: WeightEncoding
    x: te.Tensor
    weights: tuple[te.Tensor, ...]
    storage: TernaryStorage = "bitplanes"

    @property
    def group_scale(self) -> te.Tensor:
        """``alpha`` of a ternary layer: float32 or int8 ``[R, S, G, K]`` (asymmetric: that of
        ``t = 1``)."""
        return self.weights[-2] if self.encoding == ASYMMETRIC else self.weights[-1]

    def ternary(self, r, s, c, k):
        """``t[k, c, r, s]`` (int32); zero on padding channels."""
        if self.storage == "base3":
            return decode_trit(self.weights[0], k, c, r, s)
        plus, minus = self.weights[:2]
        return decode_bit(plus, k, c, r, s) - decode_bit(minus, k, c, r, s)

    def integer_weight(self, r, s, c, k):
        """The int32 weight of the integer forms: ``t * alpha_q`` or the int8 weight (zero on
        padding channels)."""
        if self.encoding == "int8":
            channels = self.shape.in_channels
            value = self.weights[0][r, s, tirx.min(c, channels - 1), k].astype("int32")
            return tirx.if_then_else(c < channels, value, 0)
        group = c // self.shape.group_size
        t = self.ternary(r, s, c, k)
        alpha_q = self.group_scale[r, s, group, k].astype("int32")
        if self.encoding == ASYMMETRIC:
            negative_q = self.weights[-1][r, s, group, k].astype("int32")
            alpha_q = tirx.if_then_else(t < 0, negative_q, alpha_q)
        return t * alpha_q


def layer_arguments(
    shape: Conv2dShape, encoding: WeightEncoding, storage: TernaryStorage = "bitplanes"
) -> LayerArguments:
    """The input placeholders of a kernel for ``encoding`` (see :func:`conv2d_compute`), its
    ternary weights stored as ``storage``."""
    k_h, k_w = shape.kernel
    x = te.placeholder((shape.batch, shape.in_channels, shape.height, shape.width), name="x")
    if encoding == "int8":
        weight = te.placeholder((k_h, k_w, shape.in_channels, shape.out_channels), "int8", "w")
        return LayerArguments(shape, encoding, x, (weight,))
    scale_dims = (k_h, k_w, shape.num_groups, shape.out_channels)
    scale_dtype = "float32" if encoding == "ternary_group_scales" else "int8"
    scales = [te.placeholder(scale_dims, scale_dtype, name="alpha")]
    if encoding == ASYMMETRIC:
        scales.append(te.placeholder(scale_dims, scale_dtype, name="negative_alpha"))
    if storage == "base3":
        byte_dims = (k_h, k_w, -(-shape.padded_channels // TRITS_PER_BYTE), shape.out_channels)
        trits = te.placeholder(byte_dims, "uint8", name="trits")
        return LayerArguments(shape, encoding, x, (trits, *scales), storage)
    plane_dims = (k_h, k_w, -(-shape.padded_channels // WORD_BITS), shape.out_channels)
    plus = te.placeholder(plane_dims, "uint32", name="plus")
    minus = te.placeholder(plane_dims, "uint32", name="minus")
    return LayerArguments(shape, encoding, x, (plus, minus, *scales), storage)


def _decoded_weights(args: LayerArguments) -> te.Tensor:
    """``wdec[r, s, c, k]``: ``t`` (float32, group scales) or the integer weight (int32)."""
    shape = args.shape
    dims = (*shape.kernel, shape.padded_channels, shape.out_channels)
    if args.encoding == "ternary_group_scales":
        return te.compute(dims, lambda *i: args.ternary(*i).astype("float32"), name="wdec")
    return te.compute(dims, args.integer_weight, name="wdec")


def _window(xq: te.Tensor, shape: Conv2dShape, b, c, oh, ow, r, s):
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    return xq[b, c, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w]


def _group_scaled_output(xq, wdec, alpha, bias, shape: Conv2dShape, act: ActQuant, out_w: int):
    """The bitplane core with float group scales; returns ``y``'s value before the epilogue."""
    size, k_h, k_w = shape.group_size, *shape.kernel
    j = te.reduce_axis((0, size), name="j")

    def group_sum(b, k, g, r, s, oh, ow):
        c = g * size + j
        product = wdec[r, s, c, k] * _window(xq, shape, b, c, oh, ow, r, s)
        return te.sum(product, axis=j)

    dims = (shape.batch, shape.out_channels, shape.num_groups, k_h, k_w, shape.out_height, out_w)
    psum = te.compute(dims, group_sum, name="psum")
    g = te.reduce_axis((0, shape.num_groups), name="g")
    r = te.reduce_axis((0, k_h), name="r")
    s = te.reduce_axis((0, k_w), name="s")

    def scaled_sum(b, k, oh, ow):
        term = alpha[r, s, g, k].astype("float64") * psum[b, k, g, r, s, oh, ow].astype("float64")
        return te.sum(term, axis=[g, r, s])

    acc_dims = (shape.batch, shape.out_channels, shape.out_height, out_w)
    acc = te.compute(acc_dims, scaled_sum, name="acc")
    scale = tirx.const(float(np.float32(act.scale)), "float64")
    return lambda b, k, oh, ow: (acc[b, k, oh, ow] * scale).astype("float32") + bias[k]


def _integer_output(xq, wdec, out_scale, bias, shape: Conv2dShape, out_w: int):
    """The integer form: exact int32 accumulation, one float multiply per output; returns
    ``y``'s value before the epilogue."""
    k_h, k_w = shape.kernel
    c = te.reduce_axis((0, shape.padded_channels), name="c")
    r = te.reduce_axis((0, k_h), name="r")
    s = te.reduce_axis((0, k_w), name="s")

    def integer_sum(b, k, oh, ow):
        product = wdec[r, s, c, k] * _window(xq, shape, b, c, oh, ow, r, s).astype("int32")
        return te.sum(product, axis=[c, r, s])

    acc_dims = (shape.batch, shape.out_channels, shape.out_height, out_w)
    acc = te.compute(acc_dims, integer_sum, name="acc")
    return lambda b, k, oh, ow: dequantize(acc[b, k, oh, ow], out_scale[k]) + bias[k]


def dequantize(acc, out_scale):
    """``f32(f64(acc) * f64(out_scale))``: the product in float64, so no fused multiply-add
    can change the float32 rounding."""
    return (acc.astype("float64") * out_scale.astype("float64")).astype("float32")


def quantized_value(value, act: ActQuant):
    """``clamp(round(value / s), qmin, qmax)`` of a float32 expression, in float32."""
    quotient = value / tirx.const(act.scale, "float32")
    return tirx.max(tirx.min(te.round(quotient), float(act.qmax)), float(act.qmin))


def stored_activation(value, act: ActQuant):
    """``quantized_value + offset`` as uint8: a float32 activation as the int8 dot core stores
    it (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`)."""
    return (quantized_value(value, act) + float(act.offset)).astype("uint8")


def residual_placeholder(
    shape: Conv2dShape, epilogue: Epilogue, layout: ActivationLayout
) -> te.Tensor | None:
    """The residual the epilogue adds (the output's shape, in ``layout``), or ``None``."""
    if not epilogue.residual:
        return None
    nchw = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
    return activation_placeholder(layout, nchw, "residual")


def fused_output(value, epilogue: Epilogue, residual: te.Tensor | None, layout: ActivationLayout):
    """``output(b, k, oh, ow)``: the layer's ``value(b, k, oh, ow)`` through the epilogue (the
    residual, in ``layout``, added; ReLU; the next layer's quantization)."""

    def output(b, k, oh, ow):
        y = value(b, k, oh, ow)
        if residual is not None:
            y = y + element(residual, layout, b, k, oh, ow)
        if epilogue.relu:
            y = tirx.max(y, tirx.const(0.0, "float32"))
        return y if epilogue.quantize is None else stored_activation(y, epilogue.quantize)

    return output


def output_stage(
    shape: Conv2dShape, value, epilogue: Epilogue, layout: ActivationLayout = NCHW
) -> list[te.Tensor]:
    """``y`` (in ``layout``) from ``value(b, k, oh, ow)`` and the epilogue; returns
    ``[residual, y]`` or ``[y]`` (the residual in ``layout`` too)."""
    nchw = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
    residual = residual_placeholder(shape, epilogue, layout)
    output = fused_output(value, epilogue, residual, layout)

    def blocked_output(b, kb, oh, ow, ki):
        return output(b, kb * CHANNEL_BLOCK + ki, oh, ow)

    body = output if layout == NCHW else blocked_output
    y = te.compute(activation_dims(layout, *nchw), body, name="y")
    return [residual, y] if residual is not None else [y]


def conv2d_compute(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    knobs: ConvSchedule,
    epilogue: Epilogue = NO_EPILOGUE,
) -> list[te.Tensor]:
    """TE compute of one quantized layer; returns its arguments, output last.

    ``knobs`` decides how many output columns are computed (whole vectors, see
    :meth:`ConvSchedule.padded_out_width`); the extra ones are never stored.

    Arguments by encoding:

    * ``ternary_group_scales``: ``x, plus, minus, alpha (f32 [R,S,G,K]), bias``;
    * ``ternary_int8_scales``: ``x, plus, minus, alpha_q (i8 [R,S,G,K]), out_scale (f32 [K]),
      bias``;
    * ``ternary_asymmetric_int8_scales``: as ``ternary_int8_scales`` with ``negative_q`` (i8
      ``[R,S,G,K]``, the scales of ``t = -1``) after ``alpha_q``;
    * ``int8``: ``x, weight (i8 [R,S,C,K]), out_scale, bias``;

    then ``residual`` (float32, the output's shape) if the epilogue adds one.
    """
    args = layer_arguments(shape, encoding)
    x, inputs = args.x, [args.x, *args.weights]
    bias = te.placeholder((shape.out_channels,), name="bias")
    wdec = _decoded_weights(args)
    out_w = knobs.padded_out_width(shape)
    if encoding == "ternary_group_scales":
        xq = _quantized_input(x, shape, act, "float32", out_w)
        value = _group_scaled_output(xq, wdec, args.group_scale, bias, shape, act, out_w)
        return [*inputs, bias, *output_stage(shape, value, epilogue)]
    out_scale = te.placeholder((shape.out_channels,), name="out_scale")
    xq = _quantized_input(x, shape, act, "int32", out_w)
    value = _integer_output(xq, wdec, out_scale, bias, shape, out_w)
    return [*inputs, out_scale, bias, *output_stage(shape, value, epilogue)]


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def schedule_conv2d(func: tvm.tirx.PrimFunc, knobs: ConvSchedule) -> Schedule:
    """Apply the default CPU schedule (see the module docstring) to ``conv2d_compute``'s func."""
    sch = Schedule(func)
    _parallel_outer(sch, "xq", 2)
    if knobs.decode_once:
        _parallel_outer(sch, "wdec", 1)
        _vectorize_innermost(sch, "wdec", knobs.lanes)
    else:
        sch.compute_inline(sch.get_sblock("wdec"))
    if knobs.vector_axis == "channels":
        _schedule_channel_vectors(sch, knobs)
    else:
        _schedule_width_vectors(sch, knobs)
    return sch


def _parallel_outer(sch: Schedule, block: str, loops: int) -> None:
    outer = sch.get_loops(sch.get_sblock(block))[:loops]
    sch.parallel(sch.fuse(*outer) if loops > 1 else outer[0])


def _vectorize_innermost(sch: Schedule, block: str, lanes: int) -> None:
    innermost = sch.get_loops(sch.get_sblock(block))[-1]
    if loop_extent(sch, innermost) % lanes == 0:
        sch.vectorize(sch.split(innermost, [None, lanes])[1])


def has_block(sch: Schedule, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except tvm.s_tir.ScheduleError:
        return False
    return True


def _schedule_width_vectors(sch: Schedule, knobs: ConvSchedule) -> None:
    """Tile ``out_channel_tile`` channels x ``lanes`` columns, reduction outside the tile."""
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    b, k, oh, ow, *reduction = sch.get_loops(acc)
    k_outer, k_inner = sch.split(k, [None, knobs.out_channel_tile])
    w_outer, w_inner = sch.split(ow, [None, knobs.lanes])
    sch.reorder(b, k_outer, oh, w_outer, *reduction, k_inner, w_inner)
    _finish_tile(sch, acc, sch.fuse(b, k_outer), reduction, k_inner, w_inner, w_outer, False)


def _schedule_channel_vectors(sch: Schedule, knobs: ConvSchedule) -> None:
    """Tile all columns of a row x ``lanes`` channels, reduction outside the tile.

    The local accumulators are laid out channels-last so that the vector lanes are contiguous.
    """
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    sch.transform_layout(acc, ("write", 0), lambda b, k, oh, ow: (b, oh, ow, k))
    if has_block(sch, "psum"):
        psum = sch.get_sblock("psum")
        sch.transform_layout(
            psum, ("write", 0), lambda b, k, g, r, s, oh, ow: (b, g, r, s, oh, ow, k)
        )
    b, k, oh, ow, *reduction = sch.get_loops(acc)
    k_outer, k_inner = sch.split(k, [None, knobs.lanes])
    sch.reorder(b, k_outer, oh, *reduction, ow, k_inner)
    _finish_tile(sch, acc, sch.fuse(b, k_outer), reduction, ow, k_inner, oh, True)


def _finish_tile(
    sch: Schedule, acc, parallel, reduction, unrolled, vector, store_at, channels_innermost: bool
) -> None:
    """Shared tail of both tilings: parallel outer loop, group sums, unroll, vectorise, store."""
    sch.parallel(parallel)
    if has_block(sch, "psum"):
        _schedule_group_sums(sch, reduction[-1], channels_innermost)
    sch.unroll(unrolled)
    sch.vectorize(vector)
    _store_tile(sch, acc, store_at)
    sch.decompose_reduction(acc, reduction[0])


def _schedule_group_sums(sch: Schedule, innermost_reduction, channels_innermost: bool) -> None:
    """Compute each group's integer sums next to their use, over the accumulator's tile.

    The group's channel loop goes outermost; the tile loops below it (output channels, then
    columns, as the block's axes come) are unrolled except the innermost, which is vectorised
    like the accumulator's.
    """
    psum, own = group_sums_at(sch, innermost_reduction)
    *tile, channel = own
    if channels_innermost:
        tile = tile[1:] + tile[:1]
    sch.reorder(channel, *tile)
    for loop in tile[:-1]:
        sch.unroll(loop)
    if tile:
        sch.vectorize(tile[-1])
    sch.decompose_reduction(psum, channel)


def group_sums_at(sch: Schedule, loop) -> tuple:
    """The ``psum`` block moved into a local buffer under ``loop``; returns it and its own
    loops there (those below ``loop``)."""
    psum = sch.get_sblock("psum")
    sch.set_scope(psum, 0, "local")
    sch.compute_at(psum, loop)
    loops = sch.get_loops(psum)
    anchor = sch.get(loop)
    depth = next(i for i, other in enumerate(loops) if sch.get(other).same_as(anchor)) + 1
    return psum, loops[depth:]


def _store_tile(sch: Schedule, acc, tile_loop) -> None:
    y = sch.get_sblock("y")
    sch.reverse_compute_at(y, tile_loop)
    loops = sch.get_loops(y)
    if loop_extent(sch, loops[-1]) > 1:
        sch.vectorize(loops[-1])


def loop_extent(sch: Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    knobs: ConvSchedule | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of one quantized layer (default knobs unless given)."""
    knobs = knobs or ConvSchedule.default_for(shape)
    func = te.create_prim_func(conv2d_compute(shape, act, encoding, knobs, epilogue))
    sch = schedule_conv2d(func, knobs)
    return sch.mod["main"]


# --------------------------------------------------------------------------------------------
# NumPy reference of the integer part
# --------------------------------------------------------------------------------------------


def reference_group_sums(x_q: np.ndarray, ternary: np.ndarray, shape: Conv2dShape) -> np.ndarray:
    """Exact ``psum[b, k, g, r, s, oh, ow]`` (int64) of the bitplane core, by NumPy."""
    k_h, k_w = shape.kernel
    (pad_h, pad_w), (stride_h, stride_w) = shape.padding, shape.stride
    (dil_h, dil_w) = shape.dilation
    padded = np.pad(x_q.astype(np.int64), ((0, 0), (0, 0), (pad_h, pad_h), (pad_w, pad_w)))
    out_h, out_w = shape.out_height, shape.out_width
    sums = np.zeros(
        (shape.batch, shape.out_channels, shape.num_groups, k_h, k_w, out_h, out_w), np.int64
    )
    for r in range(k_h):
        for s in range(k_w):
            rows = slice(r * dil_h, r * dil_h + stride_h * (out_h - 1) + 1, stride_h)
            cols = slice(s * dil_w, s * dil_w + stride_w * (out_w - 1) + 1, stride_w)
            window = padded[:, :, rows, cols]
            for g in range(shape.num_groups):
                channels = slice(g * shape.group_size, (g + 1) * shape.group_size)
                weights = ternary[:, channels, r, s].astype(np.int64)
                sums[:, :, g, r, s] = np.einsum("kc,bchw->bkhw", weights, window[:, channels])
    return sums


class BitplaneCore(Core):
    """``bitplane``: the portable core of this module, for every layer on every CPU target; it
    reads the stored 2-bit weights directly."""

    name = "bitplane"

    def available(self, target) -> bool:
        return target is None or str(target.kind.name) == "llvm"

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
        output = (shape.output_dims, epilogue.output_dtype)
        layer = conv2d_prim_func(shape, act, encoding, epilogue=epilogue)
        return LayerKernels(self.name, layer, output)


BITPLANE_CORE = BitplaneCore()
