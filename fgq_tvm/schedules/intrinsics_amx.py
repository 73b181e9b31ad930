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
below build those calls for TVMScript (``T.evaluate(dot_tiles(0, 4, 6))``).

Linux gives a process the tile registers only when asked
(:func:`~fgq_tvm.cpu_features.request_amx_tile_data`); the first AMX instruction of a process
that did not ask dies of SIGILL. The configuration is per thread: every parallel task loads it
(:func:`tile_configuration`) before its first tile instruction.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

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
