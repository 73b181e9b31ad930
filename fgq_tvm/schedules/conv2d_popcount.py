"""Ternary conv2d and dense on the bitplane popcount core (AVX-512 VPOPCNTDQ): compute,
schedule, knobs.

For unsigned activations of at most :data:`MAX_BITS` bits and ternary weights with one scale
per group, in groups of a multiple of 64 channels, a group's integer sum is popcount arithmetic
(DESIGN.md, "The kernels"): with ``X_p`` the 64-bit word of bit ``p`` of 64 channels'
activations and ``P``, ``M`` the words of the channels whose weight is +1 and -1,

    ``psum[k, g, r, s] = sum_words sum_p 2^p (popcount(X_p & P) - popcount(X_p & M))``

exactly ``sum_{c in g} t[k, c, r, s] * xq[c]``. The group scales then act as on the other cores:
int8 scales ``acc = sum alpha_q * psum`` (int32), ``y = f32(f64(acc) * f64(out_scale[k])) + bias``;
float scales ``acc = sum f64(alpha) * f64(psum)``, ``y = f32(acc * s_x) + bias``: the numbers of
:func:`~fgq_tvm.quant.layers.reference_forward`. Two PrimFuncs:

* the **pack** (:func:`popcount_pack_compute`), run once at load time: the stored base-3 weights
  (:func:`~fgq_tvm.schedules.conv2d.pack_trits`) as bit masks ``wbits [K/8, R, S, W, 2, 8]``
  uint64 (``W`` words of 64 channels; sign 0: +1, sign 1: -1; 8 output channels per vector);
* the **layer** (:func:`popcount_conv2d_compute`), run per inference, NCHW in and out:

  1. ``xbits [B, H, W, words, bits]``: the input quantized (zero padding) and split into bit
     planes, 64 channels to a word;
  2. ``psum [b, kb, oh, ow, g, r, s, 8]``: each group's popcount sum, 8 output channels at once
     (one ``vpandq`` and one ``vpopcntq`` per plane and sign for 8 x 64 products);
  3. ``acc``, then ``y`` after the layer's :class:`~fgq_tvm.schedules.conv2d.Epilogue`.

Cost against the int8 dot core: per 512 products of ``bits``-bit activations, ``2 * bits`` AND
and popcount pairs (plus the subtract, shift and add that combine them) against 8 ``vpdpbusd``:
even at 4 bits and with 1/4 of the weight bytes it loses to VNNI, by 2.8-6.1x per ResNet-18
layer here (``benchmarks/popcount_core.py``); it beats the AVX2 dot core on most 3x3 layers.

Schedule (:class:`PopcountSchedule`): the (batch, channel vector, row) loop in parallel; inside,
``columns`` output columns x 8 channels of group sums stay in registers while the reduction over
(group, r, s, words, planes) runs; each broadcast activation word feeds 8 channels, each weight
vector all columns.
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
    layer_arguments,
    loop_extent,
    output_stage,
    padded_extent,
    quantized_value,
)
from .core import NO_EPILOGUE, Conv2dShape, Core, Epilogue, LayerKernels, WeightEncoding
from .layout import Layouts

WORD_BITS = 64
LANES = 8  # uint64 lanes of a 512-bit vector: output channels per vector
MAX_BITS = 4
MAX_COLUMNS = 8
STORAGE = "base3"
PACKED_ARGUMENTS = 1  # the trits; the scales go to the layer as they are
FEATURE = "avx512vpopcntdq"


@dataclass(frozen=True)
class PopcountSchedule:
    """Tuning knob of the register tile.

    Attributes
    ----------
    columns
        Output columns per tile (each one vector of 8 group sums and one accumulator); divides
        the output width.
    """

    columns: int

    @staticmethod
    def default_for(shape: Conv2dShape) -> PopcountSchedule:
        """The most columns up to :data:`MAX_COLUMNS` that divide the output width."""
        return PopcountSchedule(
            max(d for d in range(1, MAX_COLUMNS + 1) if shape.out_width % d == 0)
        )


def available(target) -> bool:
    """True if ``target`` (an llvm :class:`tvm.target.Target`) has AVX-512 VPOPCNTDQ."""
    from .. import cpu_features

    return cpu_features.target_has(target, FEATURE)


def supports(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
    """Ternary weights with one scale per group (float or int8), in groups of whole 64-channel
    words, on unsigned activations of at most :data:`MAX_BITS` bits."""
    one_scale = encoding in ("ternary_group_scales", "ternary_int8_scales")
    return (
        one_scale and shape.group_size % WORD_BITS == 0 and not act.signed and act.bits <= MAX_BITS
    )


def _words(shape: Conv2dShape) -> int:
    return shape.padded_channels // WORD_BITS


def prepared_types(shape: Conv2dShape) -> tuple[tuple[tuple[int, ...], str], ...]:
    """Shape and dtype of the pack's output ``wbits``."""
    return (((-(-shape.out_channels // LANES), *shape.kernel, _words(shape), 2, LANES), "uint64"),)


def popcount_pack_compute(shape: Conv2dShape, encoding: WeightEncoding) -> list[te.Tensor]:
    """TE compute of the load-time pack: ``[trits, wbits]``."""
    args = layer_arguments(shape, encoding, STORAGE)
    i = te.reduce_axis((0, WORD_BITS), name="i")

    def pack(kb, r, s, word, sign, ki):
        k = kb * LANES + ki
        t = args.ternary(r, s, word * WORD_BITS + i, tirx.min(k, shape.out_channels - 1))
        match = tirx.all(k < shape.out_channels, t == 1 - 2 * sign.astype("int32"))
        bit = tirx.if_then_else(match, tirx.const(1, "uint64"), tirx.const(0, "uint64"))
        return te.sum(bit << i.astype("uint64"), axis=i)

    ((dims, _),) = prepared_types(shape)
    return [args.weights[0], te.compute(dims, pack, name="wbits")]


def popcount_conv2d_compute(
    shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding, epilogue: Epilogue = NO_EPILOGUE
) -> list[te.Tensor]:
    """TE compute of the layer; returns its arguments, output last: ``x``, ``wbits``, the
    scales (``alpha`` float32, or ``alpha_q`` int8 and ``out_scale``), ``bias``, the epilogue's
    ``residual``, ``y`` (all NCHW)."""
    x = te.placeholder((shape.batch, shape.in_channels, shape.height, shape.width), name="x")
    ((wbits_dims, _),) = prepared_types(shape)
    wbits = te.placeholder(wbits_dims, "uint64", name="wbits")
    psum = _group_sums(_bitplanes(x, shape, act), wbits, shape, act.bits)
    alpha_dtype = "float32" if encoding == "ternary_group_scales" else "int8"
    alpha = te.placeholder(
        (*shape.kernel, shape.num_groups, shape.out_channels), alpha_dtype, "alpha"
    )
    bias = te.placeholder((shape.out_channels,), name="bias")
    acc = _scaled_sum(psum, alpha, shape)
    if encoding == "ternary_group_scales":
        scale = tirx.const(float(np.float32(act.scale)), "float64")

        def value(b, k, oh, ow):
            return (acc[b, k // LANES, oh, ow, k % LANES] * scale).astype("float32") + bias[k]

        return [x, wbits, alpha, bias, *output_stage(shape, value, epilogue)]
    out_scale = te.placeholder((shape.out_channels,), name="out_scale")

    def integer_value(b, k, oh, ow):
        return dequantize(acc[b, k // LANES, oh, ow, k % LANES], out_scale[k]) + bias[k]

    return [x, wbits, alpha, out_scale, bias, *output_stage(shape, integer_value, epilogue)]


def _bitplanes(x: te.Tensor, shape: Conv2dShape, act: ActQuant) -> te.Tensor:
    """``xbits[b, h, w, word, p]``: bit ``i`` is bit ``p`` of ``xq[b, 64 word + i, h, w]``
    (zero-padded spatially and up to whole words)."""
    pad_h, pad_w = shape.padding
    height = padded_extent(shape.height, pad_h, shape.out_height, shape, axis=0)
    width = padded_extent(shape.width, pad_w, shape.out_width, shape, axis=1)
    i = te.reduce_axis((0, WORD_BITS), name="i")

    def bitplane(b, h, w, word, p):
        c = word * WORD_BITS + i
        inside = tirx.all(
            c < shape.in_channels, h >= pad_h, h < shape.height + pad_h,
            w >= pad_w, w < shape.width + pad_w,
        )  # fmt: skip
        value = x[b, tirx.min(c, shape.in_channels - 1), h - pad_h, w - pad_w]
        level = quantized_value(value, act).astype("uint64")
        bit = tirx.if_then_else(inside, (level >> p.astype("uint64")) & 1, tirx.const(0, "uint64"))
        return te.sum(bit << i.astype("uint64"), axis=i)

    dims = (shape.batch, height, width, _words(shape), act.bits)
    return te.compute(dims, bitplane, name="xbits")


def _group_sums(xbits: te.Tensor, wbits: te.Tensor, shape: Conv2dShape, bits: int) -> te.Tensor:
    """``psum``: each group's exact integer sum from popcounts (int32)."""
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    group_words = shape.group_size // WORD_BITS
    j = te.reduce_axis((0, group_words), name="j")
    p = te.reduce_axis((0, bits), name="p")

    def group_sum(b, kb, oh, ow, g, r, s, ki):
        word = g * group_words + j
        plane = xbits[b, oh * stride_h + r * dil_h, ow * stride_w + s * dil_w, word, p]
        plus = tirx.popcount(plane & wbits[kb, r, s, word, 0, ki]).astype("int32")
        minus = tirx.popcount(plane & wbits[kb, r, s, word, 1, ki]).astype("int32")
        return te.sum((plus - minus) << p, axis=[j, p])

    out_blocks = int(wbits.shape[0])
    dims = (shape.batch, out_blocks, shape.out_height, shape.out_width, shape.num_groups)
    return te.compute((*dims, *shape.kernel, LANES), group_sum, name="psum")


def _scaled_sum(psum: te.Tensor, alpha: te.Tensor, shape: Conv2dShape) -> te.Tensor:
    """``acc``: the group sums times their scales, summed over (group, r, s); int32 for int8
    scales, float64 for float ones."""
    g = te.reduce_axis((0, shape.num_groups), name="g")
    r = te.reduce_axis((0, shape.kernel[0]), name="r")
    s = te.reduce_axis((0, shape.kernel[1]), name="s")
    dtype = "int32" if alpha.dtype == "int8" else "float64"

    def scaled(b, kb, oh, ow, ki):
        k = tirx.min(kb * LANES + ki, shape.out_channels - 1)
        term = alpha[r, s, g, k].astype(dtype) * psum[b, kb, oh, ow, g, r, s, ki].astype(dtype)
        return te.sum(term, axis=[g, r, s])

    return te.compute(psum.shape[:4] + [LANES], scaled, name="acc")


def schedule_popcount_conv2d(sch: Schedule, knobs: PopcountSchedule) -> None:
    """The register tile of the module docstring, in place."""
    _schedule_bitplanes(sch)
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    b, kb, oh, ow, ki, g, r, s = sch.get_loops(acc)
    ow_outer, ow_inner = sch.split(ow, [None, knobs.columns])
    sch.reorder(b, kb, oh, ow_outer, g, r, s, ow_inner, ki)
    sch.parallel(sch.fuse(b, kb, oh))
    sch.reverse_compute_at(sch.get_sblock("y"), ow_outer, preserve_unit_loops=True)
    psum = sch.get_sblock("psum")
    sch.set_scope(psum, 0, "local")
    sch.compute_at(psum, s, preserve_unit_loops=True)
    *_, columns, lanes, j, p = sch.get_loops(psum)
    sch.reorder(j, p, columns, lanes)
    sch.vectorize(lanes)
    sch.unroll(columns)
    sch.decompose_reduction(psum, j)
    sch.vectorize(ki)
    init = sch.decompose_reduction(acc, g)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ow_inner)


def _schedule_bitplanes(sch: Schedule) -> None:
    """Rows in parallel; each word's bits gathered for a vector of columns at once."""
    xbits = sch.get_sblock("xbits")
    b, h, w, word, p, i = sch.get_loops(xbits)
    sch.reorder(b, h, word, p, i, w)
    sch.parallel(sch.fuse(b, h))
    if loop_extent(sch, w) > 1:
        sch.vectorize(w)
    sch.decompose_reduction(xbits, i)


def schedule_popcount_pack(func: tvm.tirx.PrimFunc) -> Schedule:
    """The load-time pack: parallel over output channel vectors."""
    sch = Schedule(func)
    sch.parallel(sch.get_loops(sch.get_sblock("wbits"))[0])
    return sch


def popcount_pack_prim_func(shape: Conv2dShape, encoding: WeightEncoding) -> tvm.tirx.PrimFunc:
    """The scheduled load-time pack of one layer's weights into bit masks."""
    return schedule_popcount_pack(te.create_prim_func(popcount_pack_compute(shape, encoding))).mod[
        "main"
    ]


def popcount_conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    knobs: PopcountSchedule | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of one layer on the popcount core (weights packed)."""
    sch = Schedule(te.create_prim_func(popcount_conv2d_compute(shape, act, encoding, epilogue)))
    schedule_popcount_conv2d(sch, knobs or PopcountSchedule.default_for(shape))
    return sch.mod["main"]


class PopcountCore(Core):
    """``popcount-vpopcntdq``: the bitplane popcount core (see the module docstring)."""

    name = "popcount-vpopcntdq"
    ternary_storage = STORAGE

    def available(self, target) -> bool:
        return target is not None and available(target)

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return supports(shape, act, encoding)

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        return LayerKernels(
            self.name,
            popcount_conv2d_prim_func(shape, act, encoding, None, epilogue),
            (shape.output_dims, epilogue.output_dtype),
            popcount_pack_prim_func(shape, encoding),
            prepared_types(shape),
            PACKED_ARGUMENTS,
        )


POPCOUNT_CORE = PopcountCore()
