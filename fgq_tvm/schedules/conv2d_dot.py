"""Integer conv2d and dense on the integer dot cores: compute, schedule, knobs.

Two cores share this module; they differ only in their dot instruction
(:class:`~fgq_tvm.schedules.intrinsics_x86.DotInstruction`, written ``L x D`` below: ``L``
int32 output lanes per vector, ``D`` channels per activation word):

* ``int8-dot-vnni`` (AVX-512 VNNI, :data:`~fgq_tvm.schedules.intrinsics_x86.VNNI_DOT`):
  ``vpdpbusd``, 16 x 4, activation bytes times int8 weights;
* ``int16-dot-avx2`` (AVX2 without VNNI, :data:`~fgq_tvm.schedules.intrinsics_x86.AVX2_DOT`):
  ``vpmaddwd``, 8 x 2, activations and weights widened to int16.

For the integer weight encodings (``ternary_int8_scales``: ``w = t * alpha_q``, and its
asymmetric form with ``alpha_q`` per sign; ``int8``) the
layer is ``acc = sum w * xq`` in int32 and ``y = f32(f64(acc) * f64(out_scale[k])) + bias``; for
ternary weights with float group scales (groups of a multiple of ``D`` channels, unsigned
activations) each group's integer sum ``psum`` comes from the dot core and
``acc += f64(alpha) * f64(psum)`` runs in float64, ``y = f32(acc * s_x) + bias``. These are the
numbers of :mod:`fgq_tvm.schedules.conv2d` (``reference_forward`` checks both). Two PrimFuncs:

* the **pack** (:func:`dot_pack_compute`), run once when the module is loaded: the stored
  weights (ternary in base 3, five to a byte, with their int8 scales; or int8; see
  :data:`~fgq_tvm.schedules.conv2d.TernaryStorage`) decoded into the dot core's layout,
  ``wpack [K/L, R, S, C/D, L, D]`` (zeros pad C to whole words and K to whole vectors); for
  signed activations also ``offset_sums[k] = 128 * sum w[k]``;
* the **layer** (:func:`dot_conv2d_compute`), run per inference:

  1. ``xq``: the input quantized to activation bytes (:class:`QuantizedInput`; only padded when
     the previous kernel wrote the bytes; widened to int16 for AVX2), ``D`` consecutive
     channels per 32-bit word: ``[B, C/D, H, W, D]`` from an NCHW input, ``[B, C/16, H, W, 16]``
     from an NCHW16c one (:mod:`~fgq_tvm.schedules.layout`). ``vpdpbusd`` multiplies unsigned
     by signed bytes, so signed activations are stored plus 128 (padding included) and
     ``offset_sums`` is subtracted from the exact int32 sum (both cores read the same bytes);
  2. ``acc[b, kb, oh, ow, L]``: for each kernel position and activation word, one dot
     instruction per output column adds ``L`` channels x ``D`` products (group scales: into
     ``psum`` per group, then scaled);
  3. ``y``: the float output (NCHW or NCHW16c), after the layer's
     :class:`~fgq_tvm.schedules.conv2d.Epilogue` (residual add, ReLU, and quantization to the
     next layer's activation bytes where that layer is the only reader).

Schedule (:class:`DotSchedule`): the (batch, channel block, row) loop in parallel; inside,
``columns`` output columns x ``channel_blocks`` blocks of ``L`` channels stay in registers while
the reduction over (r, s, C/D) runs; each weight tile is loaded once for all columns, each
broadcast activation word once for all channel blocks. Tuning samples both knobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..quant.layers import ActQuant
from .conv2d import (
    dequantize,
    group_sums_at,
    has_block,
    layer_arguments,
    loop_extent,
    output_stage,
    padded_extent,
    stored_activation,
)
from .core import (
    INTEGER_ENCODINGS,
    NO_EPILOGUE,
    Conv2dShape,
    Core,
    Epilogue,
    LayerKernels,
    WeightEncoding,
)
from .intrinsics_x86 import AVX2_DOT, VNNI_DOT, DotInstruction
from .layout import (
    CHANNEL_BLOCK,
    NCHW,
    NCHW16C,
    PLAIN,
    Layouts,
    activation_dims,
    activation_placeholder,
    element,
)

DOT_INSTRUCTIONS = (VNNI_DOT, AVX2_DOT)
# Stored weight arguments the pack consumes, by encoding (the rest go to the layer as they are).
PACKED_ARGUMENTS = {
    "int8": 1,
    "ternary_int8_scales": 2,
    "ternary_asymmetric_int8_scales": 3,
    "ternary_group_scales": 1,
}
STORAGE = "base3"  # the weights are decoded once, at load time: the densest form


@dataclass(frozen=True)
class DotSchedule:
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
    def default_for(
        shape: Conv2dShape, encoding: WeightEncoding, instruction: DotInstruction = VNNI_DOT
    ) -> DotSchedule:
        """The register tile with the most accumulators, the columns dividing the output
        width: for integer forms with an even number of channel blocks, two blocks of up to
        half the accumulator registers in columns each, unless one block of more columns holds
        more (each activation word then feeds two dot products: faster than one block of twice
        the columns on every ResNet-18 layer shape tried); otherwise one block."""
        integer = encoding in INTEGER_ENCODINGS
        single = DotSchedule(_widest_tile(shape, _column_limit(instruction, integer)))
        if not integer or _blocks(shape, instruction)[0] % 2:
            return single
        pair = DotSchedule(_widest_tile(shape, _column_limit(instruction, True, pair=True)), 2)
        return pair if 2 * pair.columns >= single.columns else single


def _widest_tile(shape: Conv2dShape, limit: int) -> int:
    return max(d for d in range(1, limit + 1) if shape.out_width % d == 0)


def _column_limit(instruction: DotInstruction, integer: bool, pair: bool = False) -> int:
    """The most output columns of a register tile: one accumulator per column and channel
    block; group scales keep three vectors per column live (int32 sums, a float64 pair)."""
    if not integer:
        return instruction.accumulators // 2
    return instruction.accumulators // 2 if pair else instruction.accumulators


def supports(
    shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding, instruction: DotInstruction
) -> bool:
    """Whether the dot core of ``instruction`` computes this layer: integer weights, or groups
    of a multiple of its word of channels with unsigned activations."""
    if encoding in INTEGER_ENCODINGS:
        return True
    return shape.group_size % instruction.depth == 0 and not act.signed


def _blocks(shape: Conv2dShape, instruction: DotInstruction) -> tuple[int, int]:
    """(output channel vectors, input channel words)."""
    return (
        -(-shape.out_channels // instruction.lanes),
        -(-shape.padded_channels // instruction.depth),
    )


def _wpack_dims(shape: Conv2dShape, instruction: DotInstruction) -> tuple[int, ...]:
    out_blocks, channel_blocks = _blocks(shape, instruction)
    return out_blocks, *shape.kernel, channel_blocks, instruction.lanes, instruction.depth


def prepared_types(
    shape: Conv2dShape, act: ActQuant, instruction: DotInstruction
) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Shape and dtype of the pack's outputs: ``wpack`` (and ``offset_sums``)."""
    wpack = _wpack_dims(shape, instruction), instruction.weight_dtype
    return (wpack, ((shape.out_channels,), "int32")) if act.signed else (wpack,)


def dot_pack_compute(
    shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding, instruction: DotInstruction
) -> list[te.Tensor]:
    """TE compute of the load-time pack: ``[*stored weights, wpack(, offset_sums)]``.

    The stored weights are the first ``PACKED_ARGUMENTS[encoding]`` weights of
    :func:`~fgq_tvm.schedules.conv2d.layer_arguments` in :data:`STORAGE`.
    """
    args = layer_arguments(shape, encoding, STORAGE)
    stored = list(args.weights[: PACKED_ARGUMENTS[encoding]])

    def weight_value(r, s, c, k):
        if encoding == "ternary_group_scales":
            return args.ternary(r, s, c, k)
        return args.integer_weight(r, s, c, k)

    def pack(kb, r, s, cb, ki, ci):
        k, c = kb * instruction.lanes + ki, cb * instruction.depth + ci
        inside = tirx.all(k < shape.out_channels, c < shape.in_channels)
        clamped_k = tirx.min(k, shape.out_channels - 1)
        value = weight_value(r, s, tirx.min(c, shape.in_channels - 1), clamped_k)
        dtype = instruction.weight_dtype
        return tirx.if_then_else(inside, value.astype(dtype), tirx.const(0, dtype))

    wpack = te.compute(_wpack_dims(shape, instruction), pack, name="wpack")
    if not act.signed:
        return [*stored, wpack]
    r = te.reduce_axis((0, shape.kernel[0]), name="r")
    s = te.reduce_axis((0, shape.kernel[1]), name="s")
    c = te.reduce_axis((0, shape.in_channels), name="c")
    offset_sums = te.compute(
        (shape.out_channels,),
        lambda k: te.sum(weight_value(r, s, c, k) * act.offset, axis=[r, s, c]),
        name="offset_sums",
    )
    return [*stored, wpack, offset_sums]


def dot_conv2d_compute(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
    instruction: DotInstruction = VNNI_DOT,
) -> list[te.Tensor]:
    """TE compute of the layer on the dot core of ``instruction``; returns its arguments,
    output last.

    Arguments: ``x``, the pack's outputs (``wpack``, and ``offset_sums`` for signed
    activations), then the stored arguments the pack does not consume (``alpha`` for group
    scales, ``out_scale`` for the integer forms), ``bias`` and the epilogue's ``residual``.
    ``x`` is in ``layouts.input`` (float32, or with ``quantized_input`` the activation bytes),
    ``residual`` and ``y`` in ``layouts.output`` (``y``: float32, or bytes when the epilogue
    quantizes).
    """
    lanes = instruction.lanes
    nchw = (shape.batch, shape.in_channels, shape.height, shape.width)
    x_dtype = "uint8" if quantized_input else "float32"
    x = activation_placeholder(layouts.input, nchw, "x", x_dtype)
    wpack = te.placeholder(_wpack_dims(shape, instruction), instruction.weight_dtype, "wpack")
    xq = QuantizedInput(x, shape, act, layouts.input, instruction)
    bias = te.placeholder((shape.out_channels,), name="bias")
    if encoding == "ternary_group_scales":
        alpha_dims = (*shape.kernel, shape.num_groups, shape.out_channels)
        alpha = te.placeholder(alpha_dims, name="alpha")
        acc = _group_scaled_accumulate(xq, wpack, alpha, shape)
        scale = tirx.const(float(np.float32(act.scale)), "float64")

        def rescale(b, k, oh, ow):
            return (acc[b, k // lanes, oh, ow, k % lanes] * scale).astype("float32") + bias[k]

        return [x, wpack, alpha, bias, *output_stage(shape, rescale, epilogue, layouts.output)]
    acc = _dot_accumulate(xq, wpack, shape)

    def exact_sum(b, k, oh, ow):
        return acc[b, k // lanes, oh, ow, k % lanes]

    return [x, *integer_output(exact_sum, wpack, bias, shape, act, epilogue, layouts)]


def integer_output(
    exact_sum,
    wpack: te.Tensor,
    bias: te.Tensor,
    shape: Conv2dShape,
    act: ActQuant,
    epilogue: Epilogue,
    layouts: Layouts,
) -> list[te.Tensor]:
    """The integer forms' arguments after ``x`` and their output, from
    ``exact_sum(b, k, oh, ow)``, the exact int32 sum of the packed weights times the
    activation bytes: ``[wpack(, offset_sums), out_scale, bias(, residual), y]``,
    ``y = f32(f64(sum - offset_sums) * f64(out_scale)) + bias`` after the epilogue."""
    offset_sums = te.placeholder((shape.out_channels,), "int32", name="offset_sums")
    out_scale = te.placeholder((shape.out_channels,), name="out_scale")

    def integer_value(b, k, oh, ow):
        exact = exact_sum(b, k, oh, ow)
        if act.signed:
            exact = exact - offset_sums[k]
        return dequantize(exact, out_scale[k]) + bias[k]

    packed = [wpack, offset_sums] if act.signed else [wpack]
    y = output_stage(shape, integer_value, epilogue, layouts.output)
    return [*packed, out_scale, bias, *y]


class QuantizedInput:
    """The quantized input ``xq`` and how the dot core reads it: word ``(b, cb, h, w)``, element
    ``ci`` holds channel ``D cb + ci``.

    ``xq`` holds the activation bytes (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`: signed
    values plus 128; widened to the instruction's activation type), zero-padded spatially and up
    to whole words: ``[B, C/D, H, W, D]`` from an NCHW input (words are the innermost axis),
    ``[B, C/16, H, W, 16]`` from an NCHW16c one (elementwise: whole vectors in and out). A
    float32 ``x`` is quantized here; a uint8 ``x`` holds the bytes already (written by the
    previous kernel's epilogue) and is only padded.
    """

    def __init__(
        self,
        x: te.Tensor,
        shape: Conv2dShape,
        act: ActQuant,
        layout,
        instruction: DotInstruction,
    ):
        pad_h, pad_w = shape.padding
        height = padded_extent(shape.height, pad_h, shape.out_height, shape, axis=0)
        width = padded_extent(shape.width, pad_w, shape.out_width, shape, axis=1)
        self.depth = instruction.depth
        self.lanes = self.depth if layout == NCHW else CHANNEL_BLOCK
        byte = input_byte(x, shape, act, layout, instruction.activation_dtype)

        def quantize(b, cb, h, w, ci):
            return byte(b, cb * self.lanes + ci, h, w)

        words = _blocks(shape, instruction)[1]
        lane_blocks = -(-words * self.depth // self.lanes)
        dims = (shape.batch, lane_blocks, height, width, self.lanes)
        self.tensor = te.compute(dims, quantize, name="xq")

    def __getitem__(self, index):
        b, cb, h, w, ci = index
        if self.lanes == self.depth:
            return self.tensor[b, cb, h, w, ci]
        words = self.lanes // self.depth
        return self.tensor[b, cb // words, h, w, cb % words * self.depth + ci]


def input_byte(x: te.Tensor, shape: Conv2dShape, act: ActQuant, layout, dtype: str):
    """``byte(b, c, h, w)``: the activation byte (:meth:`~fgq_tvm.quant.layers.ActQuant.stored`,
    as ``dtype``) of channel ``c`` at row ``h`` and column ``w`` of the zero-padded input
    (``act.offset``, the stored zero, outside the input and beyond its channels); a uint8 ``x``
    holds the bytes already."""
    pad_h, pad_w = shape.padding

    def byte(b, c, h, w):
        inside = tirx.all(
            c < shape.in_channels, h >= pad_h, h < shape.height + pad_h,
            w >= pad_w, w < shape.width + pad_w,
        )  # fmt: skip
        channel = tirx.min(c, shape.in_channels - 1)
        value = element(x, layout, b, channel, h - pad_h, w - pad_w)
        stored = value if x.dtype == "uint8" else stored_activation(value, act)
        return tirx.if_then_else(inside, stored.astype(dtype), tirx.const(act.offset, dtype))

    return byte


def _dot_accumulate(xq, wpack: te.Tensor, shape: Conv2dShape) -> te.Tensor:
    """``acc``: the int32 sums over (r, s, channel words) of ``wpack``'s tiles."""
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    out_blocks, _, _, blocks, lanes, depth = wpack.shape
    r = te.reduce_axis((0, shape.kernel[0]), name="r")
    s = te.reduce_axis((0, shape.kernel[1]), name="s")
    cb = te.reduce_axis((0, blocks), name="cb")
    ci = te.reduce_axis((0, depth), name="ci")

    def dot(b, kb, oh, ow, ki):
        pixel = xq[b, cb, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, ci]
        product = pixel.astype("int32") * wpack[kb, r, s, cb, ki, ci].astype("int32")
        return te.sum(product, axis=[r, s, cb, ci])

    dims = (shape.batch, out_blocks, shape.out_height, shape.out_width, lanes)
    return te.compute(dims, dot, name="acc")


def _group_scaled_accumulate(xq, wpack: te.Tensor, alpha: te.Tensor, shape: Conv2dShape):
    """``psum`` per (group, r, s) from the dot core, then the float64 sum of scaled groups."""
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    k_h, k_w = shape.kernel
    out_blocks, _, _, _, lanes, depth = wpack.shape
    group_blocks = shape.group_size // depth
    cb = te.reduce_axis((0, group_blocks), name="cb")
    ci = te.reduce_axis((0, depth), name="ci")

    def group_sum(b, kb, oh, ow, g, r, s, ki):
        block = g * group_blocks + cb
        pixel = xq[b, block, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, ci]
        product = pixel.astype("int32") * wpack[kb, r, s, block, ki, ci].astype("int32")
        return te.sum(product, axis=[cb, ci])

    dims = (shape.batch, out_blocks, shape.out_height, shape.out_width)
    psum = te.compute((*dims, shape.num_groups, k_h, k_w, lanes), group_sum, name="psum")
    g = te.reduce_axis((0, shape.num_groups), name="g")
    r = te.reduce_axis((0, k_h), name="r")
    s = te.reduce_axis((0, k_w), name="s")

    def scaled_sum(b, kb, oh, ow, ki):
        k = tirx.min(kb * lanes + ki, shape.out_channels - 1)
        term = alpha[r, s, g, k].astype("float64") * psum[b, kb, oh, ow, g, r, s, ki]
        return te.sum(term.astype("float64"), axis=[g, r, s])

    return te.compute((*dims, lanes), scaled_sum, name="acc")


def schedule_dot_conv2d(sch: Schedule, knobs: DotSchedule | None = None) -> None:
    """Tensorize the accumulation with the workload's dot instruction (see the module
    docstring), in place.

    ``knobs=None`` samples them instead (``sample_categorical``): the design space that
    MetaSchedule searches (:mod:`fgq_tvm.tuning`).
    """
    instruction = workload_instruction(sch.mod["main"])
    _schedule_input(sch)
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    b, kb, oh, ow, ki, *reduction = sch.get_loops(acc)
    integer = len(reduction) == 4  # r, s, cb, ci: the dot core directly on acc
    limit = _column_limit(instruction, integer)
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
        sch.tensorize(ki, instruction.intrinsic)
        sch.unroll(kb_inner)
    else:
        _schedule_group_sums(sch, reduction[-1], instruction)
        sch.vectorize(ki)
        init = sch.decompose_reduction(acc, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ow_inner)
    vectorize_blocked_output(sch)


def workload_instruction(func: tvm.tirx.PrimFunc) -> DotInstruction:
    """The dot instruction a layer's PrimFunc was computed for (its ``wpack`` element type)."""
    wpack = next(param for param in func.params if param.name == "wpack")
    return next(i for i in DOT_INSTRUCTIONS if i.weight_dtype == wpack.ty.dtype)


def _schedule_input(sch: Schedule) -> None:
    """The quantize stage in parallel; from an NCHW16c input, whole rows per task and one
    vector per pixel."""
    b, blocks, h, _, lanes = sch.get_loops(sch.get_sblock("xq"))
    if loop_extent(sch, lanes) == CHANNEL_BLOCK:
        sch.parallel(sch.fuse(b, blocks, h))
        sch.vectorize(lanes)
    else:
        sch.parallel(sch.fuse(b, blocks))


def vectorize_blocked_output(sch: Schedule) -> None:
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


def _schedule_group_sums(sch: Schedule, innermost_reduction, instruction: DotInstruction):
    """Each group's sums next to their use: channel blocks outermost, the dot core inside.

    Unit loops vanish at ``compute_at`` (a group of one word has no block loop, a one-column
    tile no column loop); the lane loop is the first of the lanes' extent, as tiles have fewer
    columns (:func:`_column_limit`).
    """
    psum, own = group_sums_at(sch, innermost_reduction)
    # own: [columns], ki (lanes), [channel words of the group], ci
    extents = [loop_extent(sch, loop) for loop in own]
    lanes = extents.index(instruction.lanes)
    columns, ki, blocks = own[:lanes], own[lanes], own[lanes + 1 : -1]
    sch.reorder(*blocks, *columns, ki, own[-1])
    sch.decompose_reduction(psum, (blocks or columns or [ki])[0])
    sch.tensorize(ki, instruction.intrinsic)
    for loop in columns:
        sch.unroll(loop)


def schedule_dot_pack(func: tvm.tirx.PrimFunc) -> Schedule:
    """The load-time pack: parallel over output channel blocks, whole weight tiles at once."""
    sch = Schedule(func)
    wpack_loops = sch.get_loops(sch.get_sblock("wpack"))
    sch.parallel(wpack_loops[0])
    sch.vectorize(sch.fuse(*wpack_loops[-2:]))
    if has_block(sch, "offset_sums"):
        sch.parallel(sch.get_loops(sch.get_sblock("offset_sums"))[0])
    return sch


def dot_pack_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    instruction: DotInstruction = VNNI_DOT,
) -> tvm.tirx.PrimFunc:
    """The scheduled load-time pack of one layer's weights for the dot core of
    ``instruction``."""
    func = te.create_prim_func(dot_pack_compute(shape, act, encoding, instruction))
    return schedule_dot_pack(func).mod["main"]


def dot_conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    knobs: DotSchedule | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
    instruction: DotInstruction = VNNI_DOT,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of one layer on the dot core of ``instruction`` (weights
    packed)."""
    workload = dot_conv2d_workload(
        shape, act, encoding, epilogue, layouts, quantized_input, instruction
    )
    sch = Schedule(workload)
    schedule_dot_conv2d(sch, knobs or DotSchedule.default_for(shape, encoding, instruction))
    return sch.mod["main"]


def packed_layer_kernels(
    core: str,
    layer: tvm.tirx.PrimFunc,
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue,
    layouts: Layouts,
    instruction: DotInstruction,
) -> LayerKernels:
    """The kernels of a layer whose PrimFunc ``layer`` (on the core named ``core``) reads the
    weights in the dot core's packed layout for ``instruction``: with that core's load-time
    pack (:func:`dot_pack_prim_func`)."""
    return LayerKernels(
        core,
        layer,
        (activation_dims(layouts.output, *shape.output_dims), epilogue.output_dtype),
        dot_pack_prim_func(shape, act, encoding, instruction),
        prepared_types(shape, act, instruction),
        PACKED_ARGUMENTS[encoding],
        layouts,
    )


def dot_conv2d_workload(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
    instruction: DotInstruction = VNNI_DOT,
) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of the layer: what tuning records are keyed by."""
    tensors = dot_conv2d_compute(
        shape, act, encoding, epilogue, layouts, quantized_input, instruction
    )
    return te.create_prim_func(tensors)


class DotCore(Core):
    """The integer dot core of one dot instruction (see the module docstring).

    Parameters
    ----------
    name
        The core's name.
    instruction
        Its dot instruction; the target must have its feature.
    unless
        A dot instruction whose presence on the target leaves this core out (a target with
        VNNI computes what the VNNI core cannot on the bitplane core, not with AVX2).
    """

    ternary_storage = STORAGE
    layouts = (NCHW, NCHW16C)
    activation_bytes = True
    tunable = True

    def __init__(self, name: str, instruction: DotInstruction, unless: DotInstruction | None):
        self.name = name
        self.instruction = instruction
        self.unless = unless

    def available(self, target) -> bool:
        if target is None or not self.instruction.available(target):
            return False
        return self.unless is None or not self.unless.available(target)

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return supports(shape, act, encoding, self.instruction)

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        layer = dot_conv2d_prim_func(
            shape, act, encoding, None, epilogue, layouts, quantized_input, self.instruction
        )
        return packed_layer_kernels(
            self.name, layer, shape, act, encoding, epilogue, layouts, self.instruction
        )

    def workload(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> tvm.tirx.PrimFunc:
        return dot_conv2d_workload(
            shape, act, encoding, epilogue, layouts, quantized_input, self.instruction
        )

    def schedule(self, sch: Schedule) -> None:
        schedule_dot_conv2d(sch)


VNNI_CORE = DotCore("int8-dot-vnni", VNNI_DOT, unless=None)
AVX2_CORE = DotCore("int16-dot-avx2", AVX2_DOT, unless=VNNI_DOT)
