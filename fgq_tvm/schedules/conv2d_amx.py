"""Integer conv2d on Intel AMX: compute, schedule, NumPy reference, and the core.

``int8-amx`` computes the integer weight encodings (int8 layers, ternary with int8 group
scales, symmetric or asymmetric) with ``tdpbusd`` on 16 x 16 int32 tiles
(:mod:`~fgq_tvm.schedules.intrinsics_amx`): 16 output positions by 16 output channels,
summed over the kernel positions and 64 input channels per product. The
numbers are those of the VNNI dot core (:mod:`~fgq_tvm.schedules.conv2d_dot`): the same exact
int32 sums of activation bytes times int8 weights, the same ``offset_sums`` for signed
activations, the same output and epilogue (:func:`~fgq_tvm.schedules.conv2d_dot.integer_output`).

Layouts, chosen so that every tile is 16 rows of 64 contiguous bytes:

* the **weights** are the dot core's pack, ``wpack [K/16, R, S, C/4, 16, 4]``: for one kernel
  position and 64 input channels, ``wpack[kb, r, s, 16 cb : 16 cb + 16]`` is AMX's B tile
  (row ``k // 4``, column ``n`` holding four consecutive ``k``), 1,024 contiguous bytes. The
  pack runs once at load time (:func:`~fgq_tvm.schedules.conv2d_dot.dot_pack_prim_func`);
* the **input** is quantized (or, as bytes, padded) into
  ``xq [B, C/64, stride_h, stride_w, length, 64]``: row ``h`` and column ``w`` of the padded
  input in phase ``(h % stride_h, w % stride_w)``, at position
  ``(h // stride_h) * pitch + w // stride_w`` (``pitch``: the padded width over the stride).
  Output ``(oh, ow)`` at kernel position ``(r, s)`` then reads position
  ``oh * pitch + ow + (r d_h // stride_h) * pitch + s d_w // stride_w`` of one phase, so the
  inputs of consecutive outputs are consecutive whatever the stride and dilation, and one
  activation tile is 1,024 contiguous bytes (:class:`TileGeometry`);
* the **sums** ``acc [B, K/16, groups, positions, 16]`` hold whole tiles of 16 output
  positions per group of output rows. A group is one row (``positions``: the output width
  rounded up to 16), or, where the output is narrower than a tile, all rows, a tile then
  spanning rows at ``oh * pitch + ow``: a 7x7 output with a 3x3 kernel computes 64
  positions for 49 (112 in tiles of one row). The positions never read (beyond the output
  width) cost products, not correctness.

Schedule (:class:`AmxSchedule`): the (batch, channel block, group) loop in parallel; inside,
a block of accumulator tiles (one or two tiles of 16 output positions by one or two of 16
output channels) is zeroed (after the tile configuration is loaded: it is per thread),
then per kernel position and 64 input channels its activation and weight tiles are loaded
from ``xq`` and ``wpack`` and one ``tdpbusd`` runs per accumulator, and the block is stored
once, for the epilogue to read. The accumulators stay in ``tmm0``-``tmm3`` from their zeroing
to their store: the three steps are tensor intrinsics over a local buffer, ``acc``'s block,
that the AMX code never touches (:class:`~fgq_tvm.schedules.intrinsics_amx.BlockIntrinsics`).
The output stage reads a block's sums right after it where a group is one row; where a group
spans rows, it runs after all products, from the sums in memory. A block of 2 x 2 makes four
products of four tile loads, a single tile one of two; by default a layer gets the largest
block that divides its tiles, and tuning measures each (:func:`amx_design_space`).

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

COLUMNS = TILE_ROWS  # output positions per tile: the activation tile's rows
CHANNELS = TILE_ROW_BYTES  # input channels per product: bytes per activation row
WORD = VNNI_DOT.depth  # input channels per weight word (4)
INPUT_CHUNK = 64  # input positions quantized per parallel task
GROUP_POSITIONS = 1024  # at most, where a group spans rows: its sums are on the task's stack


def supports(shape: Conv2dShape, encoding: WeightEncoding) -> bool:
    """Whether the AMX core computes this layer: integer weights, whole blocks of 64 input
    channels, not a dense layer."""
    return (
        encoding in INTEGER_ENCODINGS and shape.in_channels % CHANNELS == 0 and not shape.is_dense
    )


def whole_tiles(positions: int) -> int:
    """``positions`` rounded up to whole tiles of 16."""
    return -(-positions // COLUMNS) * COLUMNS


@dataclass(frozen=True)
class TileGeometry:
    """Where a layer's tiles lie in the AMX core's input and sums (the module docstring).

    Attributes
    ----------
    pitch
        Positions per row of one input phase in ``xq``: the padded input width over the stride.
    group_rows
        Output rows per group: one, or all of them where the output is narrower than a tile (a
        tile then spans rows) and they fit :data:`GROUP_POSITIONS` positions.
    groups
        Groups of output rows.
    positions
        Output positions computed per group, in whole tiles: ``(group_rows - 1) * pitch``
        plus the output width, rounded up (the others are computed and never read).
    length
        Positions per phase of ``xq``: as far as the last group's tiles read.
    """

    pitch: int
    group_rows: int
    groups: int
    positions: int
    length: int

    @staticmethod
    def of(shape: Conv2dShape) -> TileGeometry:
        (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
        width = padded_extent(shape.width, shape.padding[1], shape.out_width, shape, axis=1)
        pitch = -(-width // stride_w)
        spanned = shape.out_height * pitch <= GROUP_POSITIONS
        group_rows = shape.out_height if shape.out_width < COLUMNS and spanned else 1
        groups = -(-shape.out_height // group_rows)
        positions = whole_tiles((group_rows - 1) * pitch + shape.out_width)
        reach = (shape.kernel[0] - 1) * dil_h // stride_h * pitch
        reach += (shape.kernel[1] - 1) * dil_w // stride_w
        length = (groups - 1) * group_rows * pitch + positions + reach
        return TileGeometry(pitch, group_rows, groups, positions, length)

    def sum_position(self, oh, ow) -> tuple:
        """``(group, position)`` of output row ``oh``, column ``ow`` in the sums."""
        return (oh, ow) if self.group_rows == 1 else (0, oh * self.pitch + ow)


def amx_input(x: te.Tensor, shape: Conv2dShape, act: ActQuant, layout) -> te.Tensor:
    """``xq [B, C/64, stride_h, stride_w, length, 64]``: the padded input's bytes, row ``h``
    and column ``w`` in phase ``(h % stride_h, w % stride_w)`` at position
    ``(h // stride_h) * pitch + w // stride_w`` (see :class:`TileGeometry`)."""
    stride_h, stride_w = shape.stride
    geometry = TileGeometry.of(shape)
    byte = input_byte(x, shape, act, layout, "uint8")

    def quantize(b, cb, phase_h, phase_w, q, ci):
        h = q // geometry.pitch * stride_h + phase_h
        return byte(b, cb * CHANNELS + ci, h, q % geometry.pitch * stride_w + phase_w)

    dims = (shape.batch, shape.in_channels // CHANNELS, stride_h, stride_w, geometry.length)
    return te.compute((*dims, CHANNELS), quantize, name="xq")


def amx_accumulate(xq: te.Tensor, wpack: te.Tensor, shape: Conv2dShape) -> te.Tensor:
    """``acc[b, kb, group, position, ki]``: the exact int32 sums over kernel positions and
    input channels, in whole tiles of 16 output positions per group of rows."""
    (stride_h, stride_w), (dil_h, dil_w) = shape.stride, shape.dilation
    geometry = TileGeometry.of(shape)
    r = te.reduce_axis((0, shape.kernel[0]), name="r")
    s = te.reduce_axis((0, shape.kernel[1]), name="s")
    cb = te.reduce_axis((0, shape.in_channels // CHANNELS), name="cb")
    word = te.reduce_axis((0, CHANNELS // WORD), name="word")
    ci = te.reduce_axis((0, WORD), name="ci")

    def tile_sum(b, kb, group, p, ki):
        h, w = r * dil_h, s * dil_w  # the input row and column read, from the output's
        first = group * geometry.group_rows * geometry.pitch + p
        q = first + h // stride_h * geometry.pitch + w // stride_w
        pixel = xq[b, cb, h % stride_h, w % stride_w, q, word * WORD + ci]
        weight = wpack[kb, r, s, cb * (CHANNELS // WORD) + word, ki, ci]
        return te.sum(pixel.astype("int32") * weight.astype("int32"), axis=[r, s, cb, word, ci])

    dims = (shape.batch, wpack.shape[0], geometry.groups, geometry.positions, LANES)
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
    geometry = TileGeometry.of(shape)

    def exact_sum(b, k, oh, ow):
        return acc[(b, k // LANES, *geometry.sum_position(oh, ow), k % LANES)]

    return [x, *integer_output(exact_sum, wpack, bias, shape, act, epilogue, layouts)]


@dataclass(frozen=True)
class AmxSchedule:
    """Tuning knobs of the block of accumulator tiles.

    Attributes
    ----------
    row_tiles
        Tiles of 16 output positions per block (1 or 2): each weight tile loaded feeds that
        many products.
    channel_tiles
        Tiles of 16 output channels per block (1 or 2): each activation tile loaded feeds that
        many products.

    A block of 2 x 2 accumulators makes four ``tdpbusd`` of four tile loads, where one
    accumulator makes one of two.
    """

    row_tiles: int = 1
    channel_tiles: int = 1

    @staticmethod
    def choices(position_tiles: int, channel_blocks: int) -> tuple[AmxSchedule, ...]:
        """The blocks that divide ``position_tiles`` tiles of 16 output positions (per group)
        by ``channel_blocks`` blocks of 16 output channels."""
        return tuple(
            AmxSchedule(rows, channels)
            for rows in range(1, BLOCK_LIMIT + 1)
            for channels in range(1, BLOCK_LIMIT + 1)
            if position_tiles % rows == 0 and channel_blocks % channels == 0
        )

    @staticmethod
    def choices_for(shape: Conv2dShape) -> tuple[AmxSchedule, ...]:
        """The blocks of the layer's tiles (:meth:`choices`)."""
        positions = TileGeometry.of(shape).positions
        return AmxSchedule.choices(positions // COLUMNS, -(-shape.out_channels // LANES))

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
    _schedule_input(sch)
    acc = sch.get_sblock("acc")
    b, kb, group, p, ki, r, s, cb, word, ci = sch.get_loops(acc)
    rows_per_group = loop_extent(sch, sch.get_loops("y")[2]) // loop_extent(sch, group)
    if rows_per_group == 1:
        sch.set_scope(acc, 0, "local")
    kb_outer, kb_inner = sch.split(kb, [None, knobs.channel_tiles])
    p_outer, p_inner = sch.split(p, [None, knobs.row_tiles * COLUMNS])
    sch.reorder(b, kb_outer, group, p_outer, r, s, cb, kb_inner, p_inner, ki, word, ci)
    task = sch.fuse(b, kb_outer, group)
    sch.parallel(task)
    tile = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(tile, p_outer, preserve_unit_loops=True)  # stored per block
    if rows_per_group == 1:  # a block's outputs lie in one output row
        sch.reverse_compute_at(sch.get_sblock("y"), p_outer, preserve_unit_loops=True)
    else:
        y_loops = sch.get_loops("y")
        sch.parallel(sch.fuse(*y_loops[:2]))
    zero = sch.decompose_reduction(acc, r)
    sch.tensorize(sch.get_loops(zero)[-3], block.zero)
    sch.tensorize(kb_inner, block.dot)
    sch.tensorize(
        sch.get_loops(tile)[-4], block.store if rows_per_group == 1 else block.store_global
    )
    vectorize_blocked_output(sch)


def _schedule_input(sch: Schedule) -> None:
    """The input's bytes in parallel, :data:`INPUT_CHUNK` positions a task, one vector of 64
    channels each."""
    b, cb, phase_h, phase_w, q, ci = sch.get_loops(sch.get_sblock("xq"))
    q_outer, _ = sch.split(q, [None, INPUT_CHUNK])
    sch.parallel(sch.fuse(b, cb, phase_h, phase_w, q_outer))
    sch.vectorize(ci)


def amx_design_space(sch: Schedule, tiles: TileIntrinsics = AMX_TILES) -> list[Schedule]:
    """The schedules MetaSchedule searches for a workload (:func:`amx_conv2d_workload`): one
    per block of tiles that divides its output. The block is not a sampled decision: each
    block tensorizes with its own intrinsics, which a trace replays by name."""
    _, channel_blocks, _, positions, _ = (
        loop_extent(sch, loop) for loop in sch.get_loops("acc")[:5]
    )
    spaces = []
    for knobs in AmxSchedule.choices(positions // COLUMNS, channel_blocks):
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
        self.tiles.register()  # before a record's trace tensorizes with them
        return amx_conv2d_workload(shape, act, encoding, epilogue, layouts, quantized_input)

    def schedule(self, sch: Schedule) -> list[Schedule]:
        return amx_design_space(sch, self.tiles)


AMX_CORE = AmxCore()
