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
intrinsics compute one accumulator tile with them for the AMX core
(:class:`TileIntrinsics`: :data:`AMX_TILES`, and :data:`EMULATED_TILES`, the same steps in
plain code for CPUs without AMX).

Linux gives a process the tile registers only when asked
(:func:`~fgq_tvm.cpu_features.request_amx_tile_data`); the first AMX instruction of a process
that did not ask dies of SIGILL. The configuration is per thread: every parallel task loads it
(:func:`tile_configuration`) before its first tile instruction.
"""

from __future__ import annotations

from dataclasses import dataclass

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
# Tensor intrinsics: one 16 x 16 accumulator tile kept in tmm0 from its zeroing to its store
# --------------------------------------------------------------------------------------------

ACCUMULATOR, ACTIVATIONS, WEIGHTS = 0, 1, 2  # the tiles the intrinsics below use
_ROWS, _BYTES, _WORDS = TILE_ROWS, TILE_ROW_BYTES, TILE_ROW_BYTES // 4
_TILE = _ROWS * _BYTES


@dataclass(frozen=True)
class TileIntrinsics:
    """The names of the three tensor intrinsics that compute one accumulator tile.

    Over a ``[16, 16]`` int32 buffer ``C`` in local scope, the tile's stand-in:

    * ``zero``: ``C = 0``;
    * ``dot``: ``C[m, n] += sum A[m, 4 k4 + k1] * B[k4, n, k1]`` (``A``: ``[16, 64]`` uint8,
      ``B``: ``[16, 16, 4]`` int8, both 16 rows of 64 contiguous bytes);
    * ``store``: ``D = C`` (``D``: ``[16, 16]`` int32, rows of 64 bytes).

    On :data:`AMX_TILES` the accumulator is ``tmm0``, never ``C``: ``zero`` loads the tile
    configuration and zeroes ``tmm0``, ``dot`` loads its operands into ``tmm1`` and ``tmm2``
    and runs ``tdpbusd``, ``store`` stores ``tmm0`` to ``D``. :data:`EMULATED_TILES` does the
    same in plain code, with ``C`` as the accumulator, and reads and writes the operands the
    way the tile instructions do: from each buffer's first element, rows 64 bytes apart.
    """

    zero: str
    dot: str
    store: str


AMX_TILES = TileIntrinsics(
    "fgq_amx_zero_16x16_i32", "fgq_amx_dot_16x16x64_u8i8i32", "fgq_amx_store_16x16_i32"
)
EMULATED_TILES = TileIntrinsics(
    "fgq_amx_zero_16x16_i32_emulated",
    "fgq_amx_dot_16x16x64_u8i8i32_emulated",
    "fgq_amx_store_16x16_i32_emulated",
)


def _configuration_words() -> list[int]:
    """:func:`tile_configuration` as eight little-endian 64-bit words."""
    return [int(word) for word in tile_configuration().view("<u8")]


_CONFIGURATION = _configuration_words()


with cheap_stacks():  # TVMScript parses these without inspect.stack's cost

    @T.prim_func(s_tir=True)
    def _zero_description(C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:_ROWS, 0:_WORDS])
            for m, n in T.grid(_ROWS, _WORDS):
                with T.sblock("zero"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    C[vm, vn] = T.int32(0)

    @T.prim_func(s_tir=True)
    def _zero_amx(C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local")):
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:_ROWS, 0:_WORDS])
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
            T.evaluate(zero_tile(ACCUMULATOR))

    @T.prim_func(s_tir=True)
    def _dot_description(
        A: T.Buffer((_ROWS, _BYTES), "uint8", offset_factor=1),
        B: T.Buffer((_ROWS, _WORDS, 4), "int8", offset_factor=1),
        C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
    ):
        with T.sblock("root"):
            T.reads(C[0:_ROWS, 0:_WORDS], A[0:_ROWS, 0:_BYTES], B[0:_ROWS, 0:_WORDS, 0:4])
            T.writes(C[0:_ROWS, 0:_WORDS])
            for m, n, k4, k1 in T.grid(_ROWS, _WORDS, _ROWS, 4):
                with T.sblock("update"):
                    vm, vn, vk4, vk1 = T.axis.remap("SSRR", [m, n, k4, k1])
                    C[vm, vn] = C[vm, vn] + T.cast(A[vm, vk4 * 4 + vk1], "int32") * T.cast(
                        B[vk4, vn, vk1], "int32"
                    )

    @T.prim_func(s_tir=True)
    def _dot_amx(
        A: T.Buffer((_ROWS, _BYTES), "uint8", offset_factor=1),
        B: T.Buffer((_ROWS, _WORDS, 4), "int8", offset_factor=1),
        C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
    ):
        with T.sblock("root"):
            T.reads(C[0:_ROWS, 0:_WORDS], A[0:_ROWS, 0:_BYTES], B[0:_ROWS, 0:_WORDS, 0:4])
            T.writes(C[0:_ROWS, 0:_WORDS])
            T.evaluate(load_tile(ACTIVATIONS, A.access_ptr("r"), _BYTES))
            T.evaluate(load_tile(WEIGHTS, B.access_ptr("r"), _BYTES))
            T.evaluate(dot_tiles(ACCUMULATOR, ACTIVATIONS, WEIGHTS))

    @T.prim_func(s_tir=True)
    def _dot_emulated(
        A: T.Buffer((_ROWS, _BYTES), "uint8", offset_factor=1),
        B: T.Buffer((_ROWS, _WORDS, 4), "int8", offset_factor=1),
        C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
    ):
        with T.sblock("root"):
            T.reads(C[0:_ROWS, 0:_WORDS], A[0:_ROWS, 0:_BYTES], B[0:_ROWS, 0:_WORDS, 0:4])
            T.writes(C[0:_ROWS, 0:_WORDS])
            a = T.decl_buffer((_TILE,), "uint8", data=A.data, elem_offset=A.elem_offset)
            b = T.decl_buffer((_TILE,), "int8", data=B.data, elem_offset=B.elem_offset)
            for m, n, k4, k1 in T.grid(_ROWS, _WORDS, _ROWS, 4):
                C[m, n] = C[m, n] + T.cast(a[m * _BYTES + k4 * 4 + k1], "int32") * T.cast(
                    b[k4 * _BYTES + n * 4 + k1], "int32"
                )

    @T.prim_func(s_tir=True)
    def _store_description(
        C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
        D: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
    ):
        with T.sblock("root"):
            T.reads(C[0:_ROWS, 0:_WORDS])
            T.writes(D[0:_ROWS, 0:_WORDS])
            for m, n in T.grid(_ROWS, _WORDS):
                with T.sblock("store"):
                    vm, vn = T.axis.remap("SS", [m, n])
                    D[vm, vn] = C[vm, vn]

    @T.prim_func(s_tir=True)
    def _store_amx(
        C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
        D: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
    ):
        with T.sblock("root"):
            T.reads(C[0:_ROWS, 0:_WORDS])
            T.writes(D[0:_ROWS, 0:_WORDS])
            T.evaluate(store_tile(ACCUMULATOR, D.access_ptr("w"), _BYTES))

    @T.prim_func(s_tir=True)
    def _store_emulated(
        C: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
        D: T.Buffer((_ROWS, _WORDS), "int32", offset_factor=1, scope="local"),
    ):
        with T.sblock("root"):
            T.reads(C[0:_ROWS, 0:_WORDS])
            T.writes(D[0:_ROWS, 0:_WORDS])
            d = T.decl_buffer((_ROWS * _WORDS,), "int32", data=D.data, elem_offset=D.elem_offset)
            for m, n in T.grid(_ROWS, _WORDS):
                d[m * (_BYTES // 4) + n] = C[m, n]

    for _names, _implementations in (
        (AMX_TILES, (_zero_amx, _dot_amx, _store_amx)),
        (EMULATED_TILES, (_zero_description, _dot_emulated, _store_emulated)),
    ):
        for _name, _description, _implementation in zip(
            (_names.zero, _names.dot, _names.store),
            (_zero_description, _dot_description, _store_description),
            _implementations,
            strict=True,
        ):
            TensorIntrin.register(_name, _description, _implementation, override=True)
