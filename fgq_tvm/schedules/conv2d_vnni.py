"""Integer conv2d and dense on the int8 dot core (AVX-512 VNNI): compute, schedule, knobs.

For the integer weight encodings (``ternary_int8_scales``: ``w = t * alpha_q``; ``int8``) the
layer is ``acc = sum w * xq`` in int32 and ``y = f32(f64(acc) * f64(out_scale[k])) + bias``; for
ternary weights with float group scales (groups of a multiple of 4 channels, unsigned
activations) each group's integer sum ``psum`` comes from the dot core and
``acc += f64(alpha) * f64(psum)`` runs in float64, ``y = f32(acc * s_x) + bias``. These are the
numbers of :mod:`fgq_tvm.schedules.conv2d` (``reference_forward`` checks both). Two PrimFuncs:

* the **pack** (:func:`vnni_pack_compute`), run once when the module is loaded: the stored
  weights (ternary in base 3, five to a byte, with their int8 scales; or int8; see
  :data:`~fgq_tvm.schedules.conv2d.TernaryStorage`) decoded into the dot core's layout,
  ``wpack [K/16, R, S, C/4, 16, 4]`` int8 (zeros pad C to whole 4s and K to whole 16s); for
  signed activations also ``offset_sums[k] = 128 * sum w[k]``;
* the **layer** (:func:`vnni_conv2d_compute`), run per inference:

  1. ``xq``: the input quantized to uint8 (:class:`QuantizedInput`; only padded when the
     previous kernel wrote the bytes), 4 consecutive channels per 32-bit word:
     ``[B, C/4, H, W, 4]`` from an NCHW input, ``[B, C/16, H, W, 16]`` from an NCHW16c one
     (:mod:`~fgq_tvm.schedules.layout`). ``vpdpbusd`` multiplies unsigned by signed bytes, so
     signed activations are stored plus 128 (padding included) and ``offset_sums`` is
     subtracted from the exact int32 sum;
  2. ``acc[b, kb, oh, ow, 16]``: for each kernel position and word of 4 channels, one
     ``vpdpbusd`` (:data:`~fgq_tvm.schedules.intrinsics_x86.VNNI_DOT_16X4`) per output column
     adds 16 channels x 4 products (group scales: into ``psum`` per group, then scaled);
  3. ``y``: the float output (NCHW or NCHW16c), after the layer's
     :class:`~fgq_tvm.schedules.conv2d.Epilogue` (residual add, ReLU, and quantization to the
     next layer's activation bytes where that layer is the only reader).

Schedule (:class:`VnniSchedule`): the (batch, channel block, row) loop in parallel; inside,
``columns`` output columns x ``channel_blocks`` blocks of 16 channels stay in registers while
the reduction over (r, s, C/4) runs; each 64-byte weight tile is loaded once for all columns,
each broadcast activation word once for all channel blocks. Tuning samples both knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..quant.layers import ActQuant
from .conv2d import (
    NO_EPILOGUE,
    Conv2dShape,
    Epilogue,
    WeightEncoding,
    dequantize,
    has_block,
    layer_arguments,
    loop_extent,
    output_stage,
    padded_extent,
    stored_activation,
)
from .intrinsics_x86 import DOT_DEPTH, LANES, VNNI_DOT_16X4
from .layout import CHANNEL_BLOCK, NCHW, PLAIN, Layouts, activation_placeholder, element

INTEGER_ENCODINGS = ("ternary_int8_scales", "int8")
MAX_COLUMNS = 16
MAX_GROUP_COLUMNS = 8  # group scales keep 3 vectors per column live: int32 sums + float64 pair
# Stored weight arguments the pack consumes, by encoding (the rest go to the layer as they are).
PACKED_ARGUMENTS = {"int8": 1, "ternary_int8_scales": 2, "ternary_group_scales": 1}
STORAGE = "base3"  # the weights are decoded once, at load time: the densest form


@dataclass(frozen=True)
class VnniSchedule:
    """Tuning knobs of the register tile.

    Attributes
    ----------
    columns
        Output columns per tile (each one 16-lane int32 vector per channel block); divides the
        output width.
    channel_blocks
        Blocks of 16 output channels per tile (integer forms; group scales use 1): each
        broadcast activation word then feeds that many dot products.
    """

    columns: int
    channel_blocks: int = 1

    @staticmethod
    def default_for(shape: Conv2dShape, encoding: WeightEncoding) -> VnniSchedule:
        """Integer forms with an even number of channel blocks: two blocks of up to 8 columns
        (each activation word feeds two dot products; faster than one block of up to 16 on
        every ResNet-18 layer shape tried); otherwise one block of the most columns that fit the
        registers. The columns divide the output width."""
        out_blocks, _ = _blocks(shape)
        pair = encoding in INTEGER_ENCODINGS and out_blocks % 2 == 0
        limit = MAX_COLUMNS if encoding in INTEGER_ENCODINGS else MAX_GROUP_COLUMNS
        limit = MAX_COLUMNS // 2 if pair else limit
        columns = max(d for d in range(1, limit + 1) if shape.out_width % d == 0)
        return VnniSchedule(columns, 2 if pair else 1)


def supports(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
    """Whether the int8 dot core computes this layer: integer weights, or groups of a multiple
    of 4 channels with unsigned activations."""
    if encoding in INTEGER_ENCODINGS:
        return True
    return shape.group_size % DOT_DEPTH == 0 and not act.signed


def _blocks(shape: Conv2dShape) -> tuple[int, int]:
    """(output channel blocks of 16, input channel blocks of 4)."""
    return -(-shape.out_channels // LANES), -(-shape.padded_channels // DOT_DEPTH)


def prepared_types(shape: Conv2dShape, act: ActQuant) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Shape and dtype of the pack's outputs: ``wpack`` (and ``offset_sums``)."""
    out_blocks, channel_blocks = _blocks(shape)
    wpack = (out_blocks, *shape.kernel, channel_blocks, LANES, DOT_DEPTH), "int8"
    return (wpack, ((shape.out_channels,), "int32")) if act.signed else (wpack,)


def vnni_pack_compute(
    shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding
) -> list[te.Tensor]:
    """TE compute of the load-time pack: ``[*stored weights, wpack(, offset_sums)]``.

    The stored weights are the first ``PACKED_ARGUMENTS[encoding]`` weights of
    :func:`~fgq_tvm.schedules.conv2d.layer_arguments` in :data:`STORAGE`.
    """
    k_h, k_w = shape.kernel
    out_blocks, channel_blocks = _blocks(shape)
    args = layer_arguments(shape, encoding, STORAGE)
    stored = list(args.weights[: PACKED_ARGUMENTS[encoding]])

    def weight_value(r, s, c, k):
        if encoding == "ternary_group_scales":
            return args.ternary(r, s, c, k)
        return args.integer_weight(r, s, c, k)

    def pack(kb, r, s, cb, ki, ci):
        k, c = kb * LANES + ki, cb * DOT_DEPTH + ci
        inside = tirx.all(k < shape.out_channels, c < shape.in_channels)
        clamped_k = tirx.min(k, shape.out_channels - 1)
        value = weight_value(r, s, tirx.min(c, shape.in_channels - 1), clamped_k)
        return tirx.if_then_else(inside, value.astype("int8"), tirx.const(0, "int8"))

    wpack_dims = (out_blocks, k_h, k_w, channel_blocks, LANES, DOT_DEPTH)
    wpack = te.compute(wpack_dims, pack, name="wpack")
    if not act.signed:
        return [*stored, wpack]
    r = te.reduce_axis((0, k_h), name="r")
    s = te.reduce_axis((0, k_w), name="s")
    c = te.reduce_axis((0, shape.in_channels), name="c")
    offset_sums = te.compute(
        (shape.out_channels,),
        lambda k: te.sum(weight_value(r, s, c, k) * act.offset, axis=[r, s, c]),
        name="offset_sums",
    )
    return [*stored, wpack, offset_sums]


def vnni_conv2d_compute(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
) -> list[te.Tensor]:
    """TE compute of the layer; returns its arguments, output last.

    Arguments: ``x``, the pack's outputs (``wpack``, and ``offset_sums`` for signed
    activations), then the stored arguments the pack does not consume (``alpha`` for group
    scales, ``out_scale`` for the integer forms), ``bias`` and the epilogue's ``residual``.
    ``x`` is in ``layouts.input`` (float32, or with ``quantized_input`` the activation bytes),
    ``residual`` and ``y`` in ``layouts.output`` (``y``: float32, or bytes when the epilogue
    quantizes).
    """
    k_h, k_w = shape.kernel
    out_blocks, channel_blocks = _blocks(shape)
    nchw = (shape.batch, shape.in_channels, shape.height, shape.width)
    x_dtype = "uint8" if quantized_input else "float32"
    x = activation_placeholder(layouts.input, nchw, "x", x_dtype)
    wpack_dims = (out_blocks, k_h, k_w, channel_blocks, LANES, DOT_DEPTH)
    wpack = te.placeholder(wpack_dims, "int8", name="wpack")
    xq = QuantizedInput(x, shape, act, channel_blocks, layouts.input)
    bias = te.placeholder((shape.out_channels,), name="bias")
    if encoding == "ternary_group_scales":
        alpha_dims = (k_h, k_w, shape.num_groups, shape.out_channels)
        alpha = te.placeholder(alpha_dims, name="alpha")
        acc = _group_scaled_accumulate(xq, wpack, alpha, shape, out_blocks)
        scale = tirx.const(float(np.float32(act.scale)), "float64")

        def rescale(b, k, oh, ow):
            return (acc[b, k // LANES, oh, ow, k % LANES] * scale).astype("float32") + bias[k]

        return [x, wpack, alpha, bias, *output_stage(shape, rescale, epilogue, layouts.output)]
    acc = _dot_accumulate(xq, wpack, shape, out_blocks, channel_blocks)
    offset_sums = te.placeholder((shape.out_channels,), "int32", name="offset_sums")
    out_scale = te.placeholder((shape.out_channels,), name="out_scale")

    def integer_value(b, k, oh, ow):
        exact = acc[b, k // LANES, oh, ow, k % LANES]
        if act.signed:
            exact = exact - offset_sums[k]
        return dequantize(exact, out_scale[k]) + bias[k]

    packed = [wpack, offset_sums] if act.signed else [wpack]
    y = output_stage(shape, integer_value, epilogue, layouts.output)
    return [x, *packed, out_scale, bias, *y]


class QuantizedInput:
    """The quantized input ``xq`` and how the dot core reads it: word ``(b, cb, h, w)``, byte
    ``ci`` holds channel ``4 cb + ci``.

    ``xq`` holds the activation bytes (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`: signed
    values plus 128), zero-padded spatially and up to whole blocks: ``[B, C/4, H, W, 4]`` from
    an NCHW input (words are the innermost axis), ``[B, C/16, H, W, 16]`` from an NCHW16c one
    (elementwise: whole vectors in and out). A float32 ``x`` is quantized here; a uint8 ``x``
    holds the bytes already (written by the previous kernel's epilogue) and is only padded.
    """

    def __init__(self, x: te.Tensor, shape: Conv2dShape, act: ActQuant, blocks: int, layout):
        pad_h, pad_w = shape.padding
        height = padded_extent(shape.height, pad_h, shape.out_height, shape, axis=0)
        width = padded_extent(shape.width, pad_w, shape.out_width, shape, axis=1)
        self.lanes = DOT_DEPTH if layout == NCHW else CHANNEL_BLOCK

        def quantize(b, cb, h, w, ci):
            c = cb * self.lanes + ci
            inside = tirx.all(
                c < shape.in_channels, h >= pad_h, h < shape.height + pad_h,
                w >= pad_w, w < shape.width + pad_w,
            )  # fmt: skip
            channel = tirx.min(c, shape.in_channels - 1)
            value = element(x, layout, b, channel, h - pad_h, w - pad_w)
            stored = value if x.dtype == "uint8" else stored_activation(value, act)
            return tirx.if_then_else(inside, stored, tirx.const(act.offset, "uint8"))

        lane_blocks = -(-blocks * DOT_DEPTH // self.lanes)
        dims = (shape.batch, lane_blocks, height, width, self.lanes)
        self.tensor = te.compute(dims, quantize, name="xq")

    def __getitem__(self, index):
        b, cb, h, w, ci = index
        if self.lanes == DOT_DEPTH:
            return self.tensor[b, cb, h, w, ci]
        words = self.lanes // DOT_DEPTH
        return self.tensor[b, cb // words, h, w, cb % words * DOT_DEPTH + ci]


def _dot_accumulate(xq, wpack, shape: Conv2dShape, out_blocks: int, blocks: int) -> te.Tensor:
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    r = te.reduce_axis((0, shape.kernel[0]), name="r")
    s = te.reduce_axis((0, shape.kernel[1]), name="s")
    cb = te.reduce_axis((0, blocks), name="cb")
    ci = te.reduce_axis((0, DOT_DEPTH), name="ci")

    def dot(b, kb, oh, ow, ki):
        pixel = xq[b, cb, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, ci]
        product = pixel.astype("int32") * wpack[kb, r, s, cb, ki, ci].astype("int32")
        return te.sum(product, axis=[r, s, cb, ci])

    dims = (shape.batch, out_blocks, shape.out_height, shape.out_width, LANES)
    return te.compute(dims, dot, name="acc")


def _group_scaled_accumulate(xq, wpack, alpha, shape: Conv2dShape, out_blocks: int):
    """``psum`` per (group, r, s) from the dot core, then the float64 sum of scaled groups."""
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    k_h, k_w = shape.kernel
    group_blocks = shape.group_size // DOT_DEPTH
    cb = te.reduce_axis((0, group_blocks), name="cb")
    ci = te.reduce_axis((0, DOT_DEPTH), name="ci")

    def group_sum(b, kb, oh, ow, g, r, s, ki):
        block = g * group_blocks + cb
        pixel = xq[b, block, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, ci]
        product = pixel.astype("int32") * wpack[kb, r, s, block, ki, ci].astype("int32")
        return te.sum(product, axis=[cb, ci])

    dims = (shape.batch, out_blocks, shape.out_height, shape.out_width)
    psum = te.compute((*dims, shape.num_groups, k_h, k_w, LANES), group_sum, name="psum")
    g = te.reduce_axis((0, shape.num_groups), name="g")
    r = te.reduce_axis((0, k_h), name="r")
    s = te.reduce_axis((0, k_w), name="s")

    def scaled_sum(b, kb, oh, ow, ki):
        k = tirx.min(kb * LANES + ki, shape.out_channels - 1)
        term = alpha[r, s, g, k].astype("float64") * psum[b, kb, oh, ow, g, r, s, ki]
        return te.sum(term.astype("float64"), axis=[g, r, s])

    return te.compute((*dims, LANES), scaled_sum, name="acc")


def schedule_vnni_conv2d(sch: Schedule, knobs: VnniSchedule | None = None) -> None:
    """Tensorize the accumulation with the VNNI intrinsic (see the module docstring), in place.

    ``knobs=None`` samples them instead (``sample_categorical``): the design space that
    MetaSchedule searches (:mod:`fgq_tvm.tuning`).
    """
    _schedule_input(sch)
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    b, kb, oh, ow, ki, *reduction = sch.get_loops(acc)
    integer = len(reduction) == 4  # r, s, cb, ci: the dot core directly on acc
    limit = MAX_COLUMNS if integer else MAX_GROUP_COLUMNS
    ow_outer, ow_inner = _split(sch, ow, knobs and knobs.columns, limit, unit=integer)
    if integer:
        kb_outer, kb_inner = _split(sch, kb, knobs and knobs.channel_blocks, 2)
        r, s, cb, ci = reduction
        sch.reorder(b, kb_outer, oh, ow_outer, r, s, cb, kb_inner, ow_inner, ki, ci)
    else:  # group scales: g, r, s over scaled group sums
        kb_outer = kb
        sch.reorder(b, kb, oh, ow_outer, *reduction, ow_inner, ki)
    sch.parallel(sch.fuse(b, kb_outer, oh))
    # unit loops kept: the output's loop nest has the same shape for every sampled tile
    sch.reverse_compute_at(sch.get_sblock("y"), ow_outer, preserve_unit_loops=True)
    if integer:
        init = sch.decompose_reduction(acc, reduction[0])
        sch.tensorize(ki, VNNI_DOT_16X4)
        sch.unroll(kb_inner)
    else:
        _schedule_group_sums(sch, reduction[-1])
        sch.vectorize(ki)
        init = sch.decompose_reduction(acc, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ow_inner)
    _vectorize_blocked_output(sch)


def _schedule_input(sch: Schedule) -> None:
    """The quantize stage in parallel; from an NCHW16c input, whole rows per task and one
    vector per pixel."""
    b, blocks, h, _, lanes = sch.get_loops(sch.get_sblock("xq"))
    if loop_extent(sch, lanes) == CHANNEL_BLOCK:
        sch.parallel(sch.fuse(b, blocks, h))
        sch.vectorize(lanes)
    else:
        sch.parallel(sch.fuse(b, blocks))


def _vectorize_blocked_output(sch: Schedule) -> None:
    """An NCHW16c output tile is stored one vector of 16 channels per column."""
    y = sch.get_sblock("y")
    if len(sch.get(y).iter_vars) == 5:
        sch.vectorize(sch.get_loops(y)[-1])


def _split(sch: Schedule, loop, factor: int | None, limit: int, unit: bool = True) -> list:
    """``loop`` split into ``[outer, inner]``: inner extent ``factor``, or sampled among the
    divisors of the extent up to ``limit`` (no bound checks). ``unit=False`` samples 1 only
    when nothing else divides: a tile of extent 1 vanishes from the loop nests that
    ``compute_at`` creates, and every sample must replay the same schedule steps."""
    if factor is not None:
        return sch.split(loop, [None, factor])
    extent = loop_extent(sch, loop)
    divisors = [d for d in range(1, min(limit, extent) + 1) if extent % d == 0]
    candidates = divisors if unit else [d for d in divisors if d > 1] or [1]
    sampled = sch.sample_categorical(candidates, [1 / len(candidates)] * len(candidates))
    return sch.split(loop, [None, sampled])


def _schedule_group_sums(sch: Schedule, innermost_reduction) -> None:
    """Each group's sums next to their use: channel blocks outermost, the dot core inside.

    Unit loops vanish at ``compute_at`` (a group of 4 channels has no block loop, a one-column
    tile no column loop); the 16-lane loop is the first of extent 16, as tiles have at most 8
    columns.
    """
    psum = sch.get_sblock("psum")
    sch.set_scope(psum, 0, "local")
    sch.compute_at(psum, innermost_reduction)
    loops = sch.get_loops(psum)
    anchor = sch.get(innermost_reduction)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(anchor)) + 1
    own = loops[depth:]  # [columns], ki (16 lanes), [channel blocks of the group], ci
    lanes = next(i for i, loop in enumerate(own) if loop_extent(sch, loop) == LANES)
    columns, ki, blocks = own[:lanes], own[lanes], own[lanes + 1 : -1]
    sch.reorder(*blocks, *columns, ki, own[-1])
    sch.decompose_reduction(psum, (blocks or columns or [ki])[0])
    sch.tensorize(ki, VNNI_DOT_16X4)
    for loop in columns:
        sch.unroll(loop)


def schedule_vnni_pack(func: tvm.tirx.PrimFunc) -> Schedule:
    """The load-time pack: parallel over output channel blocks, whole 64-byte tiles at once."""
    sch = Schedule(func)
    wpack_loops = sch.get_loops(sch.get_sblock("wpack"))
    sch.parallel(wpack_loops[0])
    sch.vectorize(sch.fuse(*wpack_loops[-2:]))
    if has_block(sch, "offset_sums"):
        sch.parallel(sch.get_loops(sch.get_sblock("offset_sums"))[0])
    return sch


def vnni_pack_prim_func(
    shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding
) -> tvm.tirx.PrimFunc:
    """The scheduled load-time pack of one layer's weights for the int8 dot core."""
    func = te.create_prim_func(vnni_pack_compute(shape, act, encoding))
    return schedule_vnni_pack(func).mod["main"]


def vnni_conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    knobs: VnniSchedule | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of one layer on the int8 dot core (weights packed)."""
    workload = vnni_conv2d_workload(shape, act, encoding, epilogue, layouts, quantized_input)
    sch = Schedule(workload)
    schedule_vnni_conv2d(sch, knobs or VnniSchedule.default_for(shape, encoding))
    return sch.mod["main"]


def vnni_conv2d_workload(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of the layer: what tuning records are keyed by."""
    tensors = vnni_conv2d_compute(shape, act, encoding, epilogue, layouts, quantized_input)
    return te.create_prim_func(tensors)
