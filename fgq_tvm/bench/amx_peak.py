"""The AMX int8 peak, measured: fgq-tvm's own microbenchmark of ``tdpbusd``.

Each of ``threads`` parallel tasks configures the tiles, loads two activation tiles and two
weight tiles once, then runs ``iterations`` rounds of four ``tdpbusd`` into four accumulator
tiles (every pair of an activation and a weight tile: the 2 x 2 register blocking of an AMX
GEMM, four independent chains of products) and stores the accumulators. Nothing but the
products is in the loop, so its rate is the most the tiles give to a kernel. The accumulators
are checked against :func:`~fgq_tvm.schedules.intrinsics_amx.dot_reference` after every run:
a rate is reported only for exact products. ``fgq-tvm bench`` reports it beside the VNNI
peak, with each layer's share of it.

Where the target or this CPU has no AMX, or Linux refuses the tile state, the peak is not
measured and the reason says why (:func:`measure_amx_peak`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..cpu_features import host_has, request_amx_tile_data, target_has
from ..schedules.intrinsics_amx import (
    DOT_MACS,
    TILE_ROW_BYTES,
    TILE_ROWS,
    configure_tiles,
    dot_reference,
    dot_tiles,
    load_tile,
    release_tiles,
    store_tile,
    tile_configuration,
    zero_tile,
)
from ..timing import median

if TYPE_CHECKING:
    import tvm
    from tvm.target import Target

ITERATIONS = 100_000  # 4 products each: 6.6 GMAC per thread, about 5 ms at 1.2 TMAC/s
ACCUMULATORS = 4  # tiles 0-3; activations in tiles 4-5, weights in 6-7
TILE_BYTES = TILE_ROWS * TILE_ROW_BYTES


def amx_peak_kernel(threads: int, iterations: int = ITERATIONS) -> tvm.tirx.PrimFunc:
    """The microbenchmark as a PrimFunc ``(configuration, a, b, c)``.

    Parameters
    ----------
    threads
        Parallel tasks, one per thread of TVM's pool.
    iterations
        Rounds of four ``tdpbusd`` per task.

    Returns
    -------
    tvm.tirx.PrimFunc
        ``configuration``: the 64 bytes of
        :func:`~fgq_tvm.schedules.intrinsics_amx.tile_configuration`; ``a``: ``[2, 16, 64]``
        uint8 activation tiles; ``b``: ``[2, 16, 64]`` int8 weight tiles; ``c``:
        ``[threads, 4, 16, 16]`` int32, accumulator ``j`` of every task: ``iterations`` times
        ``a[j // 2]`` by ``b[j % 2]``.
    """
    from tvm.script import tirx as T

    from ..schedules.tvmscript_parsing import cheap_stacks

    row = TILE_ROW_BYTES  # of every tile: 64 bytes, or 16 int32 accumulators

    with cheap_stacks():  # TVMScript's parser, without inspect.stack's cost

        @T.prim_func(s_tir=True)
        def amx_peak(
            configuration: T.Buffer((64,), "uint8"),
            a: T.Buffer((2, TILE_ROWS, row), "uint8"),
            b: T.Buffer((2, TILE_ROWS, row), "int8"),
            c: T.Buffer((threads, ACCUMULATORS, TILE_ROWS, TILE_ROWS), "int32"),
        ):
            T.func_attr({"global_symbol": "amx_peak", "tirx.noalias": True})
            for task in T.parallel(threads):
                T.evaluate(configure_tiles(configuration.access_ptr("r")))
                for i in T.unroll(2):
                    T.evaluate(load_tile(4 + i, a.access_ptr("r", offset=i * TILE_BYTES), row))
                    T.evaluate(load_tile(6 + i, b.access_ptr("r", offset=i * TILE_BYTES), row))
                for j in T.unroll(ACCUMULATORS):
                    T.evaluate(zero_tile(j))
                for _ in range(iterations):
                    for j in T.unroll(ACCUMULATORS):
                        T.evaluate(dot_tiles(j, 4 + j // 2, 6 + j % 2))
                for j in T.unroll(ACCUMULATORS):
                    offset = (task * ACCUMULATORS + j) * TILE_ROWS * TILE_ROWS
                    T.evaluate(store_tile(j, c.access_ptr("w", offset=offset), row))
                T.evaluate(release_tiles())

    return amx_peak


def amx_unavailable(target: Target) -> str | None:
    """Why the AMX peak cannot be measured for ``target`` on this machine, or None.

    Parameters
    ----------
    target
        An llvm :class:`tvm.target.Target`: the microbenchmark is built for it and run here.

    Returns
    -------
    str or None
    """
    if not target_has(target, "amx-tile", "amx-int8"):
        return "the target has no AMX int8"
    if not host_has("amx_tile", "amx_int8"):
        return "this CPU has no AMX int8"
    try:
        request_amx_tile_data()
    except OSError as error:
        return f"Linux refused the tile state ({error.strerror})"
    return None


def measure_amx_peak(
    target: Target, threads: int, repeats: int, iterations: int = ITERATIONS
) -> tuple[float | None, str]:
    """The AMX int8 peak of ``threads`` cores, measured here, or why it was not.

    Parameters
    ----------
    target
        An llvm :class:`tvm.target.Target` of this CPU.
    threads
        Threads of TVM's pool at work (the caller sets the pool's size).
    repeats
        Timed runs; the median is reported, after one untimed run.
    iterations
        Rounds of four ``tdpbusd`` per thread and run.

    Returns
    -------
    tuple of (float or None, str)
        GMAC/s, and how it was measured; or None, and why not (no AMX, or products that
        differ from the NumPy reference: a rate of wrong products is no peak).
    """
    import time

    import tvm

    reason = amx_unavailable(target)
    if reason is not None:
        return None, f"not measured: {reason}"
    kernel = tvm.compile(tvm.IRModule({"amx_peak": amx_peak_kernel(threads, iterations)}), target)
    run = kernel["amx_peak"]
    rng = np.random.default_rng(0)  # small values: iterations x 64 products stay in int32
    a = rng.integers(0, 3, (2, TILE_ROWS, TILE_ROW_BYTES), dtype=np.uint8)
    b = rng.integers(-1, 2, (2, TILE_ROWS, TILE_ROW_BYTES), dtype=np.int8)
    c = tvm.runtime.tensor(np.zeros((threads, ACCUMULATORS, TILE_ROWS, TILE_ROWS), np.int32))
    arguments = [tvm.runtime.tensor(array) for array in (tile_configuration(), a, b)] + [c]
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        run(*arguments)
        seconds.append(time.perf_counter() - start)
        if not _exact(c.numpy(), a, b, iterations):
            return None, "failed: the products differ from the NumPy reference"
    macs = threads * iterations * ACCUMULATORS * DOT_MACS
    how = f"tdpbusd into {ACCUMULATORS} tiles on {threads} threads, median of {repeats} runs"
    return macs / median(seconds[1:]) / 1e9, f"measured ({how})"


def _exact(c: np.ndarray, a: np.ndarray, b: np.ndarray, iterations: int) -> bool:
    """Whether every task's accumulators hold ``iterations`` times their tiles' product."""
    expected = np.stack(
        [iterations * dot_reference(a[j // 2], b[j % 2]) for j in range(ACCUMULATORS)]
    )
    return all(np.array_equal(task, expected) for task in c)
