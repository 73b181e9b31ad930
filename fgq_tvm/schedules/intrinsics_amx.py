"""The project's own AMX int8 instructions in TIR, with their NumPy reference.

Intel AMX (``amx-tile``, ``amx-int8``: Sapphire Rapids and newer Xeons) adds eight tile
registers ``tmm0``-``tmm7`` of up to 16 rows x 64 bytes, shaped by a 64-byte configuration
(``ldtilecfg``), and one int8 product over them:

* ``tdpbusd C, A, B``: ``C[m, n] += sum_k A[m, k] * B[k // 4, 4 * n + k % 4]`` in int32, for
  a 16 x 64 tile ``A`` of unsigned bytes, a 16 x 64 tile ``B`` of signed bytes (four
  consecutive ``k`` of each column ``n`` side by side, as ``vpdpbusd`` reads them) and a
  16 x 16 int32 tile ``C``: 16,384 multiply-accumulates in one instruction.

TVM 0.27 ships no AMX intrinsic and no AMX runtime helper; the LLVM inside the wheel has the
intrinsics (``llvm.x86.ldtilecfg``, ``tilezero``, ``tileloadd64``, ``tdpbusd``,
``tilestored64``, ``tilerelease``), whose tile numbers must be constants (LLVM's ``immarg``):
a loop over tiles is unrolled (``T.unroll``) so that each call names its tile. The functions
below build those calls for TVMScript (``T.evaluate(dot_tiles(0, 4, 6))``), and three tensor
intrinsics per block of up to 2 x 2 accumulator tiles compute the block with them for the AMX
core (:class:`BlockIntrinsics`, from :data:`AMX_TILES`, and from :data:`EMULATED_TILES`, the
same steps in plain code for CPUs without AMX).

Linux gives a process the tile registers only when asked
(:func:`~fgq_tvm.cpu_features.request_amx_tile_data`); the first AMX instruction of a process
that did not ask dies of SIGILL. The configuration is per thread: every parallel task loads it
(:func:`tile_configuration`) before its first tile instruction.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass, fields

import numpy as np
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from .tvmscript_parsing import cheap_stacks

TILE_ROWS = 16
TILE_ROW_BYTES = 64
TILES = 8
DOT_MACS = TILE_ROWS * TILE_ROWS * TILE_ROW_BYTES  # one tdpbusd on full tiles: 16,384
CONFIGURATION_BYTES = 64
PALETTE = 1  # the one palette of today's AMX: 8 tiles of up to 16 rows x 64 bytes


def tile_configuration() -> np.ndarray:
    """The 64-byte ``ldtilecfg`` operand that shapes all eight tiles as full tiles.

    Byte 0 is the palette, bytes ``16 + 2 t`` (little-endian 16-bit) tile ``t``'s bytes per
    row, byte ``48 + t`` its rows; every other byte is zero.

    Returns
    -------
    numpy.ndarray
        64 ``uint8``.
    """
    config = np.zeros(CONFIGURATION_BYTES, np.uint8)
    config[0] = PALETTE
    config[16 : 16 + 2 * TILES : 2] = TILE_ROW_BYTES
    config[48 : 48 + TILES] = TILE_ROWS
    return config


def _amx(name: str, *args) -> tirx.PrimExpr:
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def _tile(number: int | tirx.PrimExpr) -> tirx.PrimExpr:
    """A tile number as LLVM wants it: an int8 constant (a loop variable only in a loop that
    is unrolled before code generation)."""
    if isinstance(number, int) and not 0 <= number < TILES:
        raise ValueError(f"AMX has tiles 0 to {TILES - 1}, not {number}")
    return T.int8(number)


def configure_tiles(configuration: tirx.PrimExpr) -> tirx.PrimExpr:
    """``ldtilecfg``: shape the tiles as the 64 bytes at ``configuration`` (a pointer) say."""
    return _amx("ldtilecfg", configuration)


def zero_tile(tile: int | tirx.PrimExpr) -> tirx.PrimExpr:
    """``tilezero``: every byte of ``tile`` zero."""
    return _amx("tilezero", _tile(tile))


def load_tile(
    tile: int | tirx.PrimExpr, pointer: tirx.PrimExpr, row_stride_bytes: int
) -> tirx.PrimExpr:
    """``tileloadd``: ``tile``'s rows from ``pointer``, ``row_stride_bytes`` apart."""
    return _amx("tileloadd64", _tile(tile), pointer, T.int64(row_stride_bytes))


def store_tile(
    tile: int | tirx.PrimExpr, pointer: tirx.PrimExpr, row_stride_bytes: int
) -> tirx.PrimExpr:
    """``tilestored``: ``tile``'s rows to ``pointer``, ``row_stride_bytes`` apart."""
    return _amx("tilestored64", _tile(tile), pointer, T.int64(row_stride_bytes))


def dot_tiles(
    accumulator: int | tirx.PrimExpr, activations: int | tirx.PrimExpr, weights: int | tirx.PrimExpr
) -> tirx.PrimExpr:
    """``tdpbusd``: ``accumulator += activations (u8) x weights (s8, in words of 4)``."""
    return _amx("tdpbusd", _tile(accumulator), _tile(activations), _tile(weights))


def release_tiles() -> tirx.PrimExpr:
    """``tilerelease``: the tiles back to their initial, unconfigured state."""
    return _amx("tilerelease")


def dot_reference(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """NumPy reference of one ``tdpbusd`` on full tiles, from zero.

    Parameters
    ----------
    activations
        ``[16, 64]`` uint8: row ``m``, reduction index ``k``.
    weights
        ``[16, 64]`` int8 in AMX's B layout: ``weights[k // 4, 4 * n + k % 4]``.

    Returns
    -------
    numpy.ndarray
        ``[16, 16]`` int32.
    """
    rows, words = weights.shape
    columns = weights.reshape(rows, words // 4, 4).transpose(0, 2, 1).reshape(4 * rows, -1)
    return activations.astype(np.int32) @ columns.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Tensor intrinsics: a block of up to 2 x 2 accumulator tiles, kept in tiles from zero to store
# --------------------------------------------------------------------------------------------

BLOCK_LIMIT = 2  # activation tiles (rows of 16 columns) and weight tiles (16 channels) per block
FIRST_ACTIVATION_TILE, FIRST_WEIGHT_TILE = 4, 6  # tiles 0-3 accumulate, 4-5 and 6-7 the operands
LANES = TILE_ROW_BYTES // 4  # int32 accumulators per tile row: output channels per weight tile


def accumulator_tile(row_tile: int, channel_tile: int, channel_tiles: int) -> int:
    """The tile that accumulates activation tile ``row_tile`` times weight tile
    ``channel_tile`` in a block of ``channel_tiles`` weight tiles."""
    return row_tile * channel_tiles + channel_tile


@dataclass(frozen=True)
class BlockIntrinsics:
    """The names of the three tensor intrinsics that compute one block of accumulator tiles.

    For a block of ``R`` activation tiles by ``N`` weight tiles, over an int32 buffer
    ``C [N, 1, 16 R, 16]`` in local scope, the block's stand-in:

    * ``zero``: ``C = 0``;
    * ``dot``: ``C[j, 0, m, n] += sum A[m, 4 k4 + k1] * B[j, 0, 0, k4, n, k1]`` (``A``:
      ``[16 R, 64]`` uint8, ``B``: ``[N, 1, 1, 16, 16, 4]`` int8, rows of 64 contiguous bytes,
      any stride between rows and between weight tiles);
    * ``store``: ``D = C`` (``D``: ``[N, 1, 16 R, 16]`` int32 in local scope, rows of 64
      contiguous bytes); ``store_global`` the same into a buffer in memory.

    The unit axes are where the AMX core's buffers have the output row (``C``, ``D``) and the
    kernel position (``B``) between the tile axis and the rows: a tensor intrinsic matches a
    region of a buffer only where every axis before its own is a unit one.

    On the tiles (:data:`AMX_TILES`), the accumulators are ``tmm0``-``tmm3``
    (:func:`accumulator_tile`), never ``C``: ``zero`` loads the tile configuration and zeroes
    them, ``dot`` loads the activation tiles into ``tmm4``-``tmm5`` and the weight tiles into
    ``tmm6``-``tmm7``, then runs one ``tdpbusd`` per accumulator, and ``store`` stores them to
    ``D``. :data:`EMULATED_TILES` does the same in plain code, with ``C`` as the accumulators,
    and reads and writes the operands the way the tile instructions do: from each tile's first
    byte, with the buffer's row stride.
    """

    zero: str
    dot: str
    store: str
    store_global: str


STEPS = tuple(field.name for field in fields(BlockIntrinsics))
STORE_SCOPES = ("local", "global")  # of D in store and store_global


@dataclass(frozen=True)
class TileIntrinsics:
    """The tensor intrinsics of every block of accumulator tiles, on the tiles or emulated.

    Attributes
    ----------
    emulated
        Whether they compute in plain code what the tile instructions do (any CPU runs them).
    """

    emulated: bool

    def block(self, row_tiles: int, channel_tiles: int) -> BlockIntrinsics:
        """Those of a block of ``row_tiles`` activation by ``channel_tiles`` weight tiles (each
        1 or 2).

        Raises
        ------
        ValueError
            A block of more tiles than AMX holds beside its operands.
        """
        if not (1 <= row_tiles <= BLOCK_LIMIT and 1 <= channel_tiles <= BLOCK_LIMIT):
            limit = f"1 to {BLOCK_LIMIT} of each"
            raise ValueError(f"no block of {row_tiles} x {channel_tiles} tiles: {limit}")
        return _registered(self.emulated)[row_tiles, channel_tiles]

    def register(self) -> None:
        """Register the intrinsics of every block, once (:meth:`block` does it too): a trace
        that tensorizes with them replays only once they are registered."""
        _registered(self.emulated)


AMX_TILES = TileIntrinsics(emulated=False)
EMULATED_TILES = TileIntrinsics(emulated=True)


def _configuration_words() -> list[int]:
    """:func:`tile_configuration` as eight little-endian 64-bit words."""
    return [int(word) for word in tile_configuration().view("<u8")]


_CONFIGURATION = _configuration_words()


def _descriptions(row_tiles: int, channel_tiles: int) -> tuple:
    """The computations of a block's intrinsics (:class:`BlockIntrinsics`), in its order."""
    rows, tiles = TILE_ROWS * row_tiles, channel_tiles

    @T.prim_func(s_tir=True)
    def zero(c: T.handle):
        C = T.match_buffer(c, (tiles, 1, rows, LANES), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:tiles, 0, 0:rows, 0:LANES])
            for j, m, n in T.grid(tiles, rows, LANES):
                with T.sblock("zero"):
                    if tiles == 1:  # no unit block axis: the kernels' blocks have none
                        vj = T.meta_var(0)
                        vm, vn = T.axis.remap("SS", [m, n])
                    else:
                        vj, vm, vn = T.axis.remap("SSS", [j, m, n])
                    C[vj, 0, vm, vn] = T.int32(0)

    @T.prim_func(s_tir=True)
    def dot(a: T.handle, b: T.handle, c: T.handle):
        A = T.match_buffer(a, (rows, TILE_ROW_BYTES), "uint8", offset_factor=1)
        B = T.match_buffer(b, (tiles, 1, 1, TILE_ROWS, LANES, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (tiles, 1, rows, LANES), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(
                C[0:tiles, 0, 0:rows, 0:LANES],
                A[0:rows, 0:TILE_ROW_BYTES],
                B[0:tiles, 0, 0, 0:TILE_ROWS, 0:LANES, 0:4],
            )
            T.writes(C[0:tiles, 0, 0:rows, 0:LANES])
            for j, m, n, k4, k1 in T.grid(tiles, rows, LANES, TILE_ROWS, 4):
                with T.sblock("update"):
                    if tiles == 1:
                        vj = T.meta_var(0)
                        vm, vn, vk4, vk1 = T.axis.remap("SSRR", [m, n, k4, k1])
                    else:
                        vj, vm, vn, vk4, vk1 = T.axis.remap("SSSRR", [j, m, n, k4, k1])
                    C[vj, 0, vm, vn] = C[vj, 0, vm, vn] + T.cast(
                        A[vm, vk4 * 4 + vk1], "int32"
                    ) * T.cast(B[vj, 0, 0, vk4, vn, vk1], "int32")

    def store(scope: str):
        @T.prim_func(s_tir=True)
        def store(c: T.handle, d: T.handle):
            C = T.match_buffer(c, (tiles, 1, rows, LANES), "int32", offset_factor=1, scope="local")
            D = T.match_buffer(d, (tiles, 1, rows, LANES), "int32", offset_factor=1, scope=scope)
            with T.sblock("root"):
                T.reads(C[0:tiles, 0, 0:rows, 0:LANES])
                T.writes(D[0:tiles, 0, 0:rows, 0:LANES])
                for j, _row, m, n in T.grid(tiles, 1, rows, LANES):  # as the kernels' store loops
                    with T.sblock("store"):
                        if tiles == 1:
                            vj = T.meta_var(0)
                            vm, vn = T.axis.remap("SS", [m, n])
                        else:
                            vj, vm, vn = T.axis.remap("SSS", [j, m, n])
                        D[vj, 0, vm, vn] = C[vj, 0, vm, vn]

        return store

    return zero, dot, *(store(scope) for scope in STORE_SCOPES)


def _implementations(row_tiles: int, channel_tiles: int, emulated: bool) -> tuple:
    """``zero``, ``dot``, ``store`` and ``store_global`` of a block: with the tile instructions,
    or ``emulated`` in plain code that reads and writes the operands at the addresses the tile
    instructions use (``zero`` then ``None``: its description is plain code)."""
    rows, tiles = TILE_ROWS * row_tiles, channel_tiles

    @T.prim_func(s_tir=True)
    def dot(a: T.handle, b: T.handle, c: T.handle):
        a_row, a_byte = T.int32(), T.int32()
        b_tile, b_kernel_row, b_kernel_column = T.int32(), T.int32(), T.int32()
        b_row, b_word, b_byte = T.int32(), T.int32(), T.int32()
        c_tile, c_output_row, c_row, c_lane = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(
            a, (rows, TILE_ROW_BYTES), "uint8", offset_factor=1, strides=[a_row, a_byte]
        )
        B = T.match_buffer(
            b,
            (tiles, 1, 1, TILE_ROWS, LANES, 4),
            "int8",
            offset_factor=1,
            strides=[b_tile, b_kernel_row, b_kernel_column, b_row, b_word, b_byte],
        )
        C = T.match_buffer(
            c,
            (tiles, 1, rows, LANES),
            "int32",
            offset_factor=1,
            scope="local",
            strides=[c_tile, c_output_row, c_row, c_lane],
        )
        with T.sblock("root"):
            T.reads(
                C[0:tiles, 0, 0:rows, 0:LANES],
                A[0:rows, 0:TILE_ROW_BYTES],
                B[0:tiles, 0, 0, 0:TILE_ROWS, 0:LANES, 0:4],
            )
            T.writes(C[0:tiles, 0, 0:rows, 0:LANES])
            if emulated:
                a_bytes = T.decl_buffer(
                    (rows * a_row,), "uint8", data=A.data, elem_offset=A.elem_offset
                )
                b_bytes = T.decl_buffer(
                    (tiles * b_tile + TILE_ROWS * b_row,),
                    "int8",
                    data=B.data,
                    elem_offset=B.elem_offset,
                )
                for j, m, n, k4, k1 in T.grid(tiles, rows, LANES, TILE_ROWS, 4):
                    activation = T.cast(a_bytes[m * a_row + k4 * 4 + k1], "int32")
                    weight = T.cast(b_bytes[j * b_tile + k4 * b_row + n * 4 + k1], "int32")
                    C[j, 0, m, n] = C[j, 0, m, n] + activation * weight
            else:  # the accumulators are tiles: C stands for them, untouched
                for i in T.unroll(row_tiles):
                    activations = A.access_ptr("r", offset=i * TILE_ROWS * a_row)
                    T.evaluate(load_tile(FIRST_ACTIVATION_TILE + i, activations, a_row))
                for j in T.unroll(tiles):
                    weights = B.access_ptr("r", offset=j * b_tile)
                    T.evaluate(load_tile(FIRST_WEIGHT_TILE + j, weights, b_row))
                for i in T.unroll(row_tiles):
                    for j in T.unroll(tiles):
                        T.evaluate(
                            dot_tiles(
                                i * tiles + j, FIRST_ACTIVATION_TILE + i, FIRST_WEIGHT_TILE + j
                            )
                        )

    def store(scope: str):
        @T.prim_func(s_tir=True)
        def store(c: T.handle, d: T.handle):
            c_tile, c_output_row, c_row, c_lane = T.int32(), T.int32(), T.int32(), T.int32()
            d_tile, d_output_row, d_row, d_lane = T.int32(), T.int32(), T.int32(), T.int32()
            C = T.match_buffer(
                c,
                (tiles, 1, rows, LANES),
                "int32",
                offset_factor=1,
                scope="local",
                strides=[c_tile, c_output_row, c_row, c_lane],
            )
            D = T.match_buffer(
                d,
                (tiles, 1, rows, LANES),
                "int32",
                offset_factor=1,
                scope=scope,
                strides=[d_tile, d_output_row, d_row, d_lane],
            )
            with T.sblock("root"):
                T.reads(C[0:tiles, 0, 0:rows, 0:LANES])
                T.writes(D[0:tiles, 0, 0:rows, 0:LANES])
                if emulated:
                    d_words = T.decl_buffer(
                        (tiles * d_tile + rows * d_row,),
                        "int32",
                        data=D.data,
                        elem_offset=D.elem_offset,
                    )
                    for j, m, n in T.grid(tiles, rows, LANES):
                        d_words[j * d_tile + m * d_row + n] = C[j, 0, m, n]
                else:
                    for i in T.unroll(row_tiles):
                        for j in T.unroll(tiles):
                            tile = D.access_ptr("w", offset=j * d_tile + i * TILE_ROWS * d_row)
                            T.evaluate(store_tile(i * tiles + j, tile, d_row * 4))

        return store

    zero = None if emulated else _zero_on_the_tiles(row_tiles, channel_tiles)
    return zero, dot, *(store(scope) for scope in STORE_SCOPES)


def _zero_on_the_tiles(row_tiles: int, channel_tiles: int):
    """``zero`` of a block with the tile instructions: the tile configuration loaded (it is
    per thread), then the block's accumulators zeroed."""
    rows, tiles, accumulators = TILE_ROWS * row_tiles, channel_tiles, row_tiles * channel_tiles

    @T.prim_func(s_tir=True)
    def zero(c: T.handle):
        C = T.match_buffer(c, (tiles, 1, rows, LANES), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:tiles, 0, 0:rows, 0:LANES])
            configuration = T.decl_buffer((8,), "uint64", scope="local")
            configuration[0] = T.uint64(_CONFIGURATION[0])
            configuration[1] = T.uint64(_CONFIGURATION[1])
            configuration[2] = T.uint64(_CONFIGURATION[2])
            configuration[3] = T.uint64(_CONFIGURATION[3])
            configuration[4] = T.uint64(_CONFIGURATION[4])
            configuration[5] = T.uint64(_CONFIGURATION[5])
            configuration[6] = T.uint64(_CONFIGURATION[6])
            configuration[7] = T.uint64(_CONFIGURATION[7])
            T.evaluate(configure_tiles(configuration.access_ptr("r")))
            for t in T.unroll(accumulators):
                T.evaluate(zero_tile(t))

    return zero


@functools.cache
def _registered(emulated: bool) -> dict[tuple[int, int], BlockIntrinsics]:
    """Register the intrinsics of every block, on the tiles or emulated, once."""
    blocks = {}
    with cheap_stacks():  # TVMScript parses these without inspect.stack's cost
        for row_tiles in range(1, BLOCK_LIMIT + 1):
            for channel_tiles in range(1, BLOCK_LIMIT + 1):
                size = f"{TILE_ROWS * row_tiles}x{LANES * channel_tiles}"
                suffix = f"{size}_emulated" if emulated else size
                names = BlockIntrinsics(*(f"fgq_amx_{step}_{suffix}" for step in STEPS))
                descriptions = _descriptions(row_tiles, channel_tiles)
                implementations = _implementations(row_tiles, channel_tiles, emulated)
                for name, description, implementation in zip(
                    astuple(names), descriptions, implementations, strict=True
                ):
                    implementation = implementation or description  # plain code already
                    TensorIntrin.register(name, description, implementation, override=True)
                blocks[row_tiles, channel_tiles] = names
    return blocks
