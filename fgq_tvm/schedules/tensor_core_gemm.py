"""The int8 tensor-core schedule of the GPU GEMM core: its knobs, its schedule, its rule.

The GEMM core (:mod:`~fgq_tvm.schedules.conv2d_cuda`) states each layer as three stages: ``a``
(the im2col matrix of the activation bytes as stored, ``[M, K]``), ``acc`` (``sum_j a[m, j] *
wgemm[n, j]`` in int32, ``[M, N]``) and ``y`` (the epilogue, one output element per ``acc``
element). Its extents are padded (:func:`padded_extents`) to whole tiles of the tensor-core
instruction.

The schedule (:func:`schedule_tensor_core_gemm`), for one thread block per ``block_m x
block_n`` tile of ``acc`` and ``warps_m x warps_n`` warps in it:

1. every ``32 * k_steps`` reduction steps, the block's threads copy the tile's slice of
   ``wgemm`` and of ``a`` into shared memory; the im2col is computed in that copy (``a`` is
   inlined into it), so the activations are read from the input tensor directly, up to 16
   bytes per thread and access (a whole vector of neighbouring channels of one pixel). With
   ``stages`` > 1 the copies are software-pipelined: they run ``stages - 1`` slices ahead of
   the products, into as many shared buffers, as ``cp.async`` (the
   :mod:`~fgq_tvm.schedules.cuda_pipeline`), so the loads overlap the tensor cores' work;
2. each warp loads its 16x32 fragments from shared memory into registers (``ldmatrix``) and
   multiplies them on the tensor cores (``mma.sync m16n8k32`` u8 x s8 -> s32), accumulating in
   registers;
3. the accumulators go through shared memory (the block's ``acc`` tile, in the bytes of the
   operand slices: the shared memory is dynamic, one allocation in which TVM lets buffers
   that are never live at once share bytes), from which the block's threads compute the
   epilogue (``y``), one output element each, consecutive threads on consecutive channels
   (NHWC: coalesced stores).

The instructions are tensor intrinsics (:mod:`~fgq_tvm.schedules.intrinsics_cuda`): the
project's ldmatrix of the unsigned A and its u8 x s8 MMA, TVM's accumulator fill, and the
ldmatrix of B (stored ``[N, K]``, so "transposed") and store of the accumulator fragments built
from TVM's templates for dynamic shared memory. Knobs: :class:`GemmTiles`;
:func:`default_tiles` picks them without tuning.

NumPy reference: ``acc = a.astype(int32) @ wgemm.astype(int32).T``; the whole layer is checked
against ``reference_forward`` (the same PrimFunc, unscheduled, on the CPU; scheduled, on a GPU
by ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.dlight import ScheduleRule

from .intrinsics_cuda import (
    FRAGMENT_K,
    FRAGMENT_M,
    FRAGMENT_N,
    SHARED_SCOPE,
    WARP,
    accumulator_fragment_layout,
    intrinsics,
    operand_fragment_layout,
)

# The attribute that marks a PrimFunc for this schedule (set by the GEMM core on its layers).
TENSOR_CORE_GEMM = "fgq.tensor_core_gemm"
PADDING = 32  # M, N and K are padded to whole multiples of this
# a thread block's dynamic shared memory, at most: what every GPU of the CUDA targets has
# (sm_75: 64 KiB; sm_80 and newer: 99 KiB or more)
SHARED_MEMORY = 64 * 1024
ROW_PADDING = 16  # bytes added to each shared row, so that ldmatrix's rows miss bank conflicts
WIDEST_COPY = 16  # bytes a thread copies into shared memory per step (one 128-bit access)
# The im2col from a float32 input quantizes in float32 lanes, of which CUDA has vectors of 4
WIDEST_FLOAT_COPY = 4
WARPS_EACH_WAY = (1, 2, 4)  # the warps of a block along M and along N that a search tries
MAX_ACCUMULATORS = 64  # int32 accumulators per thread: a 64 x 32 warp tile
STAGES = (1, 2, 3)  # slices of the operands in shared memory at once


@dataclass(frozen=True)
class GemmTiles:
    """The knobs of the tensor-core GEMM.

    Attributes
    ----------
    block_m, block_n
        The ``acc`` tile of one thread block (multiples of 16 times the warps).
    warps_m, warps_n
        Its warps, each computing a ``block_m / warps_m x block_n / warps_n`` tile.
    k_steps
        The reduction steps of 32 per copy into shared memory.
    stages
        The slices of the operands in shared memory at once: 1 copies each slice when the
        products need it, ``s`` > 1 copies ``s - 1`` slices ahead (asynchronously).
    """

    block_m: int = 64
    block_n: int = 64
    warps_m: int = 2
    warps_n: int = 2
    k_steps: int = 2
    stages: int = 1

    @property
    def threads(self) -> int:
        return WARP * self.warps_m * self.warps_n

    @property
    def shared_bytes(self) -> int:
        """The block's shared memory: the ``a`` and ``wgemm`` slices of each stage, whose bytes
        the ``acc`` tile reuses once the products are done (TVM merges a kernel's dynamic
        shared buffers into one allocation)."""
        row = FRAGMENT_K * self.k_steps + ROW_PADDING
        slices = (self.block_m + self.block_n) * row * self.stages
        return max(slices, self.block_m * self.block_n * 4)

    def check(self, m: int, n: int, k: int) -> None:
        """Raise ``ValueError`` unless these tiles divide a GEMM of padded extents ``m, n,
        k`` and fit a thread block."""
        warp_tile = (self.block_m // self.warps_m, self.block_n // self.warps_n)
        problems = []
        if m % self.block_m or n % self.block_n:
            problems.append(f"{self.block_m} x {self.block_n} blocks do not divide {m} x {n}")
        if k % (FRAGMENT_K * self.k_steps):
            problems.append(f"{self.k_steps} steps of 32 do not divide K {k}")
        if any(size % FRAGMENT_M or size == 0 for size in warp_tile):
            problems.append(f"warp tiles {warp_tile} are no multiples of 16")
        if self.stages not in STAGES:
            problems.append(f"{self.stages} stages are none of {STAGES}")
        elif k // (FRAGMENT_K * self.k_steps) < self.stages:
            problems.append(f"{self.stages} stages exceed K {k}'s copies")
        if self.shared_bytes > SHARED_MEMORY:
            problems.append(f"{self.shared_bytes} bytes of shared memory exceed {SHARED_MEMORY}")
        if problems:
            raise ValueError(f"{self}: {'; '.join(problems)}")


def padded_extents(m: int, n: int, k: int) -> tuple[int, int, int]:
    """``M, N, K`` rounded up to whole multiples of :data:`PADDING`."""
    return tuple(-(-extent // PADDING) * PADDING for extent in (m, n, k))


def default_tiles(m: int, n: int, k: int, blocks_wanted: int = 132) -> GemmTiles:
    """Tiles for a GEMM of padded extents ``m, n, k`` without tuning: the largest tiles
    (up to 128 x 64) that divide it, halved while the GEMM has fewer than ``blocks_wanted``
    thread blocks (an H100/H200 has 132 multiprocessors) and they can be."""
    block_m = next(size for size in (128, 64, 32) if m % size == 0)
    block_n = next(size for size in (64, 32) if n % size == 0)
    while (m // block_m) * (n // block_n) < blocks_wanted and max(block_m, block_n) > 32:
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
    k_steps = 2 if k % (2 * FRAGMENT_K) == 0 else 1
    return GemmTiles(block_m, block_n, min(2, block_m // 16), min(2, block_n // 16), k_steps)


def tile_candidates(m: int, n: int, k: int) -> list[GemmTiles]:
    """Every :class:`GemmTiles` that divides and fits a GEMM of padded extents ``m, n, k``:
    blocks of 32 to 256 by 32 to 128, 1, 2 or 4 warps each way whose warp tiles hold at most
    64 accumulators per thread, 1, 2 or 4 reduction steps per copy, 1 to 3 stages (the space a
    tile search measures)."""
    found = []
    for block_m, block_n, warps_m, warps_n, k_steps, stages in product(
        (32, 64, 128, 256), (32, 64, 128), *[WARPS_EACH_WAY] * 2, (1, 2, 4), STAGES
    ):
        tiles = GemmTiles(block_m, block_n, warps_m, warps_n, k_steps, stages)
        accumulators = block_m * block_n // tiles.threads
        try:
            tiles.check(m, n, k)
        except ValueError:
            continue
        if accumulators <= MAX_ACCUMULATORS:
            found.append(tiles)
    return found


def schedule_tensor_core_gemm(sch: Schedule, tiles: GemmTiles) -> None:
    """Schedule the GEMM stages ``a``, ``acc``, ``y`` of ``sch`` on the tensor cores, in
    place (see the module docstring)."""
    acc = sch.get_sblock("acc")
    tiles.check(*_extents(sch))
    fragment, block_loop, warp_loop, k_outer, k_inner = _tile(sch, acc, tiles)
    _copy_to_shared(sch, fragment, 0, k_outer, tiles, _widest_im2col_copy(sch))
    _copy_to_shared(sch, fragment, 1, k_outer, tiles, WIDEST_COPY)
    _pipeline(sch, k_outer, tiles.stages)
    sch.compute_inline(sch.get_sblock("a"))
    a_warp = sch.cache_read(fragment, 0, "warp")
    b_warp = sch.cache_read(fragment, 1, "warp")
    sch.compute_at(a_warp, k_inner)
    sch.compute_at(b_warp, k_inner)
    acc_warp = sch.cache_write(fragment, 0, "warp")
    sch.reverse_compute_at(acc_warp, warp_loop)
    sch.set_scope(acc_warp, 0, SHARED_SCOPE)
    _split_fragments(sch, acc_warp, FRAGMENT_M, FRAGMENT_N)
    sch.decompose_reduction(fragment, k_outer)
    _epilogue(sch, block_loop, tiles)
    _tensorize(sch, a_warp, b_warp, acc_warp)


def _tile(sch: Schedule, acc, tiles: GemmTiles):
    """Blockize ``acc`` into 16x16x32 fragments and tile them: returns the fragment block, the
    thread-block loop, the warp loop and the two reduction loops."""
    m, n, k = sch.get_loops(acc)
    m, m_fragment = sch.split(m, [None, FRAGMENT_M])
    n, n_fragment = sch.split(n, [None, FRAGMENT_N])
    k, k_fragment = sch.split(k, [None, FRAGMENT_K])
    sch.reorder(m, n, k, m_fragment, n_fragment, k_fragment)
    fragment = sch.blockize(m_fragment)
    m_block, m_warp, m_tile = sch.split(
        m, [None, tiles.warps_m, tiles.block_m // 16 // tiles.warps_m]
    )
    n_block, n_warp, n_tile = sch.split(
        n, [None, tiles.warps_n, tiles.block_n // 16 // tiles.warps_n]
    )
    k_outer, k_inner = sch.split(k, [None, tiles.k_steps])
    sch.reorder(m_block, n_block, m_warp, n_warp, k_outer, k_inner, m_tile, n_tile)
    block_loop = sch.fuse(m_block, n_block)
    warp_loop = sch.fuse(m_warp, n_warp)
    sch.bind(block_loop, "blockIdx.x")
    sch.bind(warp_loop, "threadIdx.y")
    return fragment, block_loop, warp_loop, k_outer, k_inner


def _widest_im2col_copy(sch: Schedule) -> int:
    """The widest vector of ``a`` one thread copies: neighbouring elements of an im2col row
    are neighbouring channels of one input pixel only within whole vectors that divide the
    channels; bytes go 16 at a time, float32 values 4."""
    (x,) = [read.source.ty for read in sch.get(sch.get_sblock("a")).reads if len(read.region) == 4]
    channels = int(x.shape[-1])
    widest = WIDEST_COPY if x.dtype == "uint8" else WIDEST_FLOAT_COPY
    return next(v for v in (16, 8, 4, 2, 1) if v <= widest and channels % v == 0)


def _copy_to_shared(sch: Schedule, fragment, operand: int, k_outer, tiles: GemmTiles, widest: int):
    """The block's slice of GEMM operand ``operand`` (0: ``a``, 1: ``wgemm``) copied into
    shared memory by all its threads, up to ``widest`` bytes per thread and step."""
    copy = sch.cache_read(fragment, operand, SHARED_SCOPE)
    sch.compute_at(copy, k_outer)
    rows, columns = sch.get_loops(copy)[-2:]
    extent = int(sch.get(rows).extent) * int(sch.get(columns).extent)
    vector = next(v for v in (16, 8, 4, 2, 1) if v <= widest and extent % (tiles.threads * v) == 0)
    fused = sch.fuse(rows, columns)
    _, warp, lane, lanes = sch.split(fused, [None, tiles.warps_m * tiles.warps_n, WARP, vector])
    sch.bind(lane, "threadIdx.x")
    sch.bind(warp, "threadIdx.y")
    sch.vectorize(lanes)
    sch.storage_align(copy, 0, axis=-2, factor=32, offset=ROW_PADDING)
    return copy


def _pipeline(sch: Schedule, k_outer, stages: int) -> None:
    """With ``stages`` > 1, the two copies into shared memory (the first statements of
    ``k_outer``) run ``stages - 1`` iterations ahead of the products, asynchronously."""
    if stages == 1:
        return
    sch.annotate(k_outer, "software_pipeline_stage", [0, 0, stages - 1])
    sch.annotate(k_outer, "software_pipeline_order", [0, 1, 2])
    sch.annotate(k_outer, "software_pipeline_async_stages", [0])


def _split_fragments(sch: Schedule, block, height: int, width: int):
    """Split the last two loops of ``block`` into ``height x width`` fragments; returns the
    fragment's first loop."""
    rows, columns = sch.get_loops(block)[-2:]
    rows_outer, rows_inner = sch.split(rows, [None, height])
    columns_outer, columns_inner = sch.split(columns, [None, width])
    sch.reorder(rows_outer, columns_outer, rows_inner, columns_inner)
    return rows_inner


def _epilogue(sch: Schedule, block_loop, tiles: GemmTiles) -> None:
    """``y`` computed per thread block from its ``acc`` tile, one element per thread and step,
    consecutive threads on consecutive output channels."""
    y = sch.get_sblock("y")
    sch.reverse_compute_at(y, block_loop)
    fused = sch.fuse(*sch.get_loops(y)[1:])  # those in the thread block
    _, warp, lane = sch.split(fused, [None, tiles.warps_m * tiles.warps_n, WARP])
    sch.bind(warp, "threadIdx.y")
    sch.bind(lane, "threadIdx.x")


def _tensorize(sch: Schedule, a_warp, b_warp, acc_warp) -> None:
    """The fragments' loads, products, fill and store on the tensor intrinsics
    (:mod:`~fgq_tvm.schedules.intrinsics_cuda`)."""
    names = intrinsics()
    a_fragment = _split_fragments(sch, a_warp, FRAGMENT_M, FRAGMENT_K)
    b_fragment = _split_fragments(sch, b_warp, FRAGMENT_N, FRAGMENT_K)
    sch.transform_layout(a_warp, ("write", 0), _in_fragments(operand_fragment_layout, FRAGMENT_K))
    sch.transform_layout(b_warp, ("write", 0), _in_fragments(operand_fragment_layout, FRAGMENT_K))
    accumulators = _in_fragments(accumulator_fragment_layout, FRAGMENT_N)
    sch.transform_layout(acc_warp, ("read", 0), accumulators)
    sch.tensorize(a_fragment, names.load_a)
    sch.tensorize(b_fragment, names.load_b)
    sch.tensorize(sch.get_loops(sch.get_sblock("acc"))[-3], names.mma)
    sch.tensorize(sch.get_loops(sch.get_sblock("acc_init"))[-2], names.fill)
    sch.tensorize(sch.get_loops(acc_warp)[-2], names.store)


def _in_fragments(layout, width: int):
    """The index map of a warp's buffer of 16 x ``width`` fragments, each laid out in the
    registers of its 32 threads by ``layout``."""
    return lambda i, j: (i // FRAGMENT_M, j // width, *layout(i % FRAGMENT_M, j % width))


class TensorCoreGemm(ScheduleRule):
    """The DLight rule that applies :func:`schedule_tensor_core_gemm` with
    :func:`default_tiles` to the PrimFuncs marked :data:`TENSOR_CORE_GEMM`."""

    def apply(self, func: tvm.tirx.PrimFunc, target, tunable: bool) -> Schedule | None:
        attrs = func.attrs if func.attrs is not None else {}
        if not attrs.get(TENSOR_CORE_GEMM, False):
            return None
        sch = Schedule(func)
        schedule_tensor_core_gemm(sch, default_tiles(*_extents(sch)))
        return sch


def _extents(sch: Schedule) -> tuple[int, int, int]:
    """``M, N, K`` of the GEMM stage ``acc``."""
    return tuple(int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("acc")))
