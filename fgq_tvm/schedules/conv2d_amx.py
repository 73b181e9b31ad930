"""Integer conv2d on Intel AMX: compute, schedule, NumPy reference, and the core.

``int8-amx`` computes the integer weight encodings (int8 layers, ternary with int8 group
scales, symmetric or asymmetric) with ``tdpbusd`` on 16 x 16 int32 tiles
(:mod:`~fgq_tvm.schedules.intrinsics_amx`): 16 output columns of one output row by 16
output channels, summed over the kernel positions and 64 input channels per product. The
numbers are those of the VNNI dot core (:mod:`~fgq_tvm.schedules.conv2d_dot`): the same exact
int32 sums of activation bytes times int8 weights, the same ``offset_sums`` for signed
activations, the same output and epilogue (:func:`~fgq_tvm.schedules.conv2d_dot.integer_output`).

Layouts, chosen so that every tile is 16 rows of 64 contiguous bytes:

* the **weights** are the dot core's pack, ``wpack [K/16, R, S, C/4, 16, 4]``: for one kernel
  position and 64 input channels, ``wpack[kb, r, s, 16 cb : 16 cb + 16]`` is AMX's B tile
  (row ``k // 4``, column ``n`` holding four consecutive ``k``), 1,024 contiguous bytes. The
  pack runs once at load time (:func:`~fgq_tvm.schedules.conv2d_dot.dot_pack_prim_func`);
* the **input** is quantized (or, as bytes, padded) into ``xq [B, C/64, H, stride, W', 64]``:
  column ``w`` of the padded input at ``[w % stride, w // stride]``, so that the 16 columns
  one tile of outputs reads at one kernel position are consecutive whatever the stride, and
  one activation tile is 1,024 contiguous bytes;
* the **sums** ``acc [B, K/16, OH, OW', 16]`` hold whole tiles (``OW'``: the output width
  rounded up to 16; the extra columns are computed and never read).

Schedule: the (batch, channel block, output row) loop in parallel; per tile of 16 columns the
accumulator tile is zeroed (after the tile configuration is loaded: it is per thread), one
``tdpbusd`` runs per kernel position and 64 input channels with its two operand tiles loaded
from ``xq`` and ``wpack``, and the tile is stored once, for the epilogue to read. It keeps the
accumulator in ``tmm0`` from its zeroing to its store: the three steps are tensor intrinsics
over a local buffer, ``acc``'s tile, that the AMX code never touches.

Supported: integer encodings with whole blocks of 64 input channels, not dense layers (one
output column would fill one row of 16). A module with a layer on this core asks Linux for the
tile state when it is loaded (:data:`~fgq_tvm.cpu_features.AMX_TILE_CORES`).

Until this core has run on a CPU with AMX it is not in
:data:`~fgq_tvm.schedules.select.CORES`: on CPUs without AMX its kernels are checked against the
reference with :data:`~fgq_tvm.schedules.intrinsics_amx.EMULATED_TILES` (layers and a whole
network, ``tests/test_amx.py``) and built to ``tdpbusd`` code; the same tests run them on the
tiles where the CPU has AMX.
"""

from __future__ import annotations

import tvm
from tvm import te
from tvm.s_tir import Schedule

from ..quant.layers import ActQuant
from .conv2d import padded_extent
from .conv2d_dot import (
    STORAGE,
    input_byte,
    integer_output,
    packed_layer_kernels,
    prepared_types,
    vectorize_blocked_output,
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
from .intrinsics_amx import AMX_TILES, TILE_ROW_BYTES, TILE_ROWS, TileIntrinsics
from .intrinsics_x86 import VNNI_DOT
from .layout import NCHW, NCHW16C, PLAIN, Layouts, activation_placeholder

COLUMNS = TILE_ROWS  # output columns per tile: the activation tile's rows
LANES = TILE_ROW_BYTES // 4  # output channels per tile: int32 accumulators per row
CHANNELS = TILE_ROW_BYTES  # input channels per product: bytes per activation row
WORD = VNNI_DOT.depth  # input channels per weight word (4)


def supports(shape: Conv2dShape, encoding: WeightEncoding) -> bool:
    """Whether the AMX core computes this layer: integer weights, whole blocks of 64 input
    channels, not a dense layer."""
    return (
        encoding in INTEGER_ENCODINGS and shape.in_channels % CHANNELS == 0 and not shape.is_dense
    )


def tile_columns(shape: Conv2dShape) -> int:
    """Output columns computed: the output width rounded up to whole tiles."""
    return -(-shape.out_width // COLUMNS) * COLUMNS


def amx_input(x: te.Tensor, shape: Conv2dShape, act: ActQuant, layout) -> te.Tensor:
    """``xq [B, C/64, H, stride, W', 64]``: the padded input's bytes, column ``w`` at
    ``[w % stride, w // stride]`` (see the module docstring)."""
    stride = shape.stride[1]
    height = padded_extent(shape.height, shape.padding[0], shape.out_height, shape, axis=0)
    width = padded_extent(shape.width, shape.padding[1], tile_columns(shape), shape, axis=1)
    byte = input_byte(x, shape, act, layout, "uint8")

    def quantize(b, cb, h, phase, column, ci):
        return byte(b, cb * CHANNELS + ci, h, column * stride + phase)

    dims = (shape.batch, shape.in_channels // CHANNELS, height, stride, -(-width // stride))
    return te.compute((*dims, CHANNELS), quantize, name="xq")


def amx_accumulate(xq: te.Tensor, wpack: te.Tensor, shape: Conv2dShape) -> te.Tensor:
    """``acc[b, kb, oh, ow, ki]``: the exact int32 sums over kernel positions and input
    channels, in whole tiles of 16 output columns."""
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    r = te.reduce_axis((0, shape.kernel[0]), name="r")
    s = te.reduce_axis((0, shape.kernel[1]), name="s")
    cb = te.reduce_axis((0, shape.in_channels // CHANNELS), name="cb")
    word = te.reduce_axis((0, CHANNELS // WORD), name="word")
    ci = te.reduce_axis((0, WORD), name="ci")

    def tile_sum(b, kb, oh, ow, ki):
        w = ow * stride_w + s * dil_w
        pixel = xq[b, cb, oh * stride_h + r * dil_h, w % stride_w, w // stride_w, word * WORD + ci]
        weight = wpack[kb, r, s, cb * (CHANNELS // WORD) + word, ki, ci]
        return te.sum(pixel.astype("int32") * weight.astype("int32"), axis=[r, s, cb, word, ci])

    out_blocks = wpack.shape[0]
    dims = (shape.batch, out_blocks, shape.out_height, tile_columns(shape), LANES)
    return te.compute(dims, tile_sum, name="acc")


def amx_conv2d_compute(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
) -> list[te.Tensor]:
    """TE compute of the layer on the AMX core; returns its arguments, output last: those of
    the VNNI dot core's integer forms (:func:`~fgq_tvm.schedules.conv2d_dot.dot_conv2d_compute`).
    """
    nchw = (shape.batch, shape.in_channels, shape.height, shape.width)
    x_dtype = "uint8" if quantized_input else "float32"
    x = activation_placeholder(layouts.input, nchw, "x", x_dtype)
    wpack_dims = prepared_types(shape, act, VNNI_DOT)[0][0]
    wpack = te.placeholder(wpack_dims, "int8", "wpack")
    bias = te.placeholder((shape.out_channels,), name="bias")
    acc = amx_accumulate(amx_input(x, shape, act, layouts.input), wpack, shape)
    return [x, *integer_output(acc, wpack, bias, shape, act, epilogue, layouts)]


def schedule_amx_conv2d(sch: Schedule, tiles: TileIntrinsics = AMX_TILES) -> None:
    """The schedule of the module docstring, in place, with the accumulator tile's three steps
    tensorized with ``tiles`` (:data:`~fgq_tvm.schedules.intrinsics_amx.EMULATED_TILES`: the
    same loops and addressing in plain code, which any CPU runs)."""
    xq_loops = sch.get_loops(sch.get_sblock("xq"))
    sch.parallel(sch.fuse(*xq_loops[:3]))
    sch.vectorize(xq_loops[-1])
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    b, kb, oh, ow, ki, r, s, cb, word, ci = sch.get_loops(acc)
    ow_outer, ow_inner = sch.split(ow, [None, COLUMNS])
    sch.reorder(b, kb, oh, ow_outer, r, s, cb, ow_inner, ki, word, ci)
    sch.parallel(sch.fuse(b, kb, oh))
    sch.reverse_compute_at(sch.get_sblock("y"), ow_outer, preserve_unit_loops=True)
    tile = sch.cache_write(acc, 0, "local")  # its store lands inside ow_outer, before y
    zero = sch.decompose_reduction(acc, r)
    sch.tensorize(sch.get_loops(zero)[-2], tiles.zero)
    sch.tensorize(ow_inner, tiles.dot)
    sch.tensorize(sch.get_loops(tile)[-2], tiles.store)
    vectorize_blocked_output(sch)


def amx_conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
    tiles: TileIntrinsics = AMX_TILES,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of one layer on the AMX core (weights packed by the dot core's
    pack), its tiles computed by ``tiles`` (see :func:`schedule_amx_conv2d`)."""
    compute = amx_conv2d_compute(shape, act, encoding, epilogue, layouts, quantized_input)
    sch = Schedule(te.create_prim_func(compute))
    schedule_amx_conv2d(sch, tiles)
    return sch.mod["main"]


class AmxCore(Core):
    """``int8-amx``: integer layers on AMX tiles (see the module docstring)."""

    name = "int8-amx"  # in cpu_features.AMX_TILE_CORES: its modules ask for the tile state
    ternary_storage = STORAGE
    layouts = (NCHW, NCHW16C)
    activation_bytes = True

    def __init__(self, tiles: TileIntrinsics = AMX_TILES):
        self.tiles = tiles

    def available(self, target) -> bool:
        from .. import cpu_features

        return target is not None and cpu_features.target_has(target, "amx-tile", "amx-int8")

    def supports(self, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding) -> bool:
        return supports(shape, encoding)

    def layer_kernels(
        self,
        shape: Conv2dShape,
        act: ActQuant,
        encoding: WeightEncoding,
        epilogue: Epilogue,
        layouts: Layouts,
        quantized_input: bool,
    ) -> LayerKernels:
        layer = amx_conv2d_prim_func(
            shape, act, encoding, epilogue, layouts, quantized_input, self.tiles
        )
        return packed_layer_kernels(
            self.name, layer, shape, act, encoding, epilogue, layouts, VNNI_DOT
        )


AMX_CORE = AmxCore()
