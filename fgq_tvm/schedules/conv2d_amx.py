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

Schedule (:class:`AmxSchedule`): the (batch, channel block, output row) loop in parallel;
inside, a block of accumulator tiles (one or two tiles of 16 output columns by one or two of
16 output channels) is zeroed (after the tile configuration is loaded: it is per thread),
then per kernel position and 64 input channels its activation and weight tiles are loaded
from ``xq`` and ``wpack`` and one ``tdpbusd`` runs per accumulator, and the block is stored
once, for the epilogue to read. The accumulators stay in ``tmm0``-``tmm3`` from their zeroing
to their store: the three steps are tensor intrinsics over a local buffer, ``acc``'s block,
that the AMX code never touches (:class:`~fgq_tvm.schedules.intrinsics_amx.BlockIntrinsics`).
A block of 2 x 2 makes four products of four tile loads, a single tile one of two; by default
a layer gets the largest block that divides its tiles, and tuning measures each
(:func:`amx_design_space`).

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

from dataclasses import dataclass

import tvm
from tvm import te
from tvm.s_tir import Schedule

from ..quant.layers import ActQuant
from .conv2d import loop_extent, padded_extent
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
from .intrinsics_amx import (
    AMX_TILES,
    BLOCK_LIMIT,
    LANES,
    TILE_ROW_BYTES,
    TILE_ROWS,
    TileIntrinsics,
)
from .intrinsics_x86 import VNNI_DOT
from .layout import NCHW, NCHW16C, PLAIN, Layouts, activation_placeholder

COLUMNS = TILE_ROWS  # output columns per tile: the activation tile's rows
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


@dataclass(frozen=True)
class AmxSchedule:
    """Tuning knobs of the block of accumulator tiles.

    Attributes
    ----------
    row_tiles
        Tiles of 16 output columns per block (1 or 2): each weight tile loaded feeds that many
        products.
    channel_tiles
        Tiles of 16 output channels per block (1 or 2): each activation tile loaded feeds that
        many products.

    A block of 2 x 2 accumulators makes four ``tdpbusd`` of four tile loads, where one
    accumulator makes one of two.
    """

    row_tiles: int = 1
    channel_tiles: int = 1

    @staticmethod
    def choices(column_tiles: int, channel_blocks: int) -> tuple[AmxSchedule, ...]:
        """The blocks that divide ``column_tiles`` tiles of 16 output columns by
        ``channel_blocks`` blocks of 16 output channels."""
        return tuple(
            AmxSchedule(rows, channels)
            for rows in range(1, BLOCK_LIMIT + 1)
            for channels in range(1, BLOCK_LIMIT + 1)
            if column_tiles % rows == 0 and channel_blocks % channels == 0
        )

    @staticmethod
    def choices_for(shape: Conv2dShape) -> tuple[AmxSchedule, ...]:
        """The blocks of the layer's tiles (:meth:`choices`)."""
        return AmxSchedule.choices(tile_columns(shape) // COLUMNS, -(-shape.out_channels // LANES))

    @staticmethod
    def default_for(shape: Conv2dShape) -> AmxSchedule:
        """The block with the most accumulators (the fewest tile loads per product)."""
        return max(AmxSchedule.choices_for(shape), key=lambda knobs: knobs.accumulators)

    @property
    def accumulators(self) -> int:
        return self.row_tiles * self.channel_tiles


def schedule_amx_conv2d(
    sch: Schedule, knobs: AmxSchedule = AmxSchedule(), tiles: TileIntrinsics = AMX_TILES
) -> None:
    """The schedule of the module docstring, in place, for a block of ``knobs`` tiles whose
    three steps are tensorized with ``tiles``
    (:data:`~fgq_tvm.schedules.intrinsics_amx.EMULATED_TILES`: the same loops and addressing
    in plain code, which any CPU runs)."""
    block = tiles.block(knobs.row_tiles, knobs.channel_tiles)
    xq_loops = sch.get_loops(sch.get_sblock("xq"))
    sch.parallel(sch.fuse(*xq_loops[:3]))
    sch.vectorize(xq_loops[-1])
    acc = sch.get_sblock("acc")
    sch.set_scope(acc, 0, "local")
    b, kb, oh, ow, ki, r, s, cb, word, ci = sch.get_loops(acc)
    kb_outer, kb_inner = sch.split(kb, [None, knobs.channel_tiles])
    ow_outer, ow_inner = sch.split(ow, [None, knobs.row_tiles * COLUMNS])
    sch.reorder(b, kb_outer, oh, ow_outer, r, s, cb, kb_inner, ow_inner, ki, word, ci)
    sch.parallel(sch.fuse(b, kb_outer, oh))
    sch.reverse_compute_at(sch.get_sblock("y"), ow_outer, preserve_unit_loops=True)
    tile = sch.cache_write(acc, 0, "local")  # its store lands inside ow_outer, before y
    zero = sch.decompose_reduction(acc, r)
    sch.tensorize(sch.get_loops(zero)[-3], block.zero)
    sch.tensorize(kb_inner, block.dot)
    sch.tensorize(sch.get_loops(tile)[-4], block.store)
    vectorize_blocked_output(sch)


def amx_design_space(sch: Schedule, tiles: TileIntrinsics = AMX_TILES) -> list[Schedule]:
    """The schedules MetaSchedule searches for a workload (:func:`amx_conv2d_workload`): one
    per block of tiles that divides its output. The block is not a sampled decision: each
    block tensorizes with its own intrinsics, which a trace replays by name."""
    _, channel_blocks, _, columns, _ = (loop_extent(sch, loop) for loop in sch.get_loops("acc")[:5])
    spaces = []
    for knobs in AmxSchedule.choices(columns // COLUMNS, channel_blocks):
        space = sch.copy()
        schedule_amx_conv2d(space, knobs, tiles)
        spaces.append(space)
    return spaces


def amx_conv2d_workload(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of the layer: what tuning records are keyed by."""
    compute = amx_conv2d_compute(shape, act, encoding, epilogue, layouts, quantized_input)
    return te.create_prim_func(compute)


def amx_conv2d_prim_func(
    shape: Conv2dShape,
    act: ActQuant,
    encoding: WeightEncoding,
    knobs: AmxSchedule | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
    layouts: Layouts = PLAIN,
    quantized_input: bool = False,
    tiles: TileIntrinsics = AMX_TILES,
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of one layer on the AMX core (weights packed by the dot core's
    pack), with the block ``knobs`` (default: :meth:`AmxSchedule.default_for`) computed by
    ``tiles`` (see :func:`schedule_amx_conv2d`)."""
    sch = Schedule(amx_conv2d_workload(shape, act, encoding, epilogue, layouts, quantized_input))
    schedule_amx_conv2d(sch, knobs or AmxSchedule.default_for(shape), tiles)
    return sch.mod["main"]


class AmxCore(Core):
    """``int8-amx``: integer layers on AMX tiles (see the module docstring)."""

    name = "int8-amx"  # in cpu_features.AMX_TILE_CORES: its modules ask for the tile state
    ternary_storage = STORAGE
    layouts = (NCHW, NCHW16C)
    activation_bytes = True
    tunable = True

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
            shape, act, encoding, None, epilogue, layouts, quantized_input, self.tiles
        )
        return packed_layer_kernels(
            self.name, layer, shape, act, encoding, epilogue, layouts, VNNI_DOT
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
        return amx_conv2d_workload(shape, act, encoding, epilogue, layouts, quantized_input)

    def schedule(self, sch: Schedule) -> list[Schedule]:
        return amx_design_space(sch, self.tiles)


AMX_CORE = AmxCore()
