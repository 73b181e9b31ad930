"""TVMScript parsed without ``inspect.stack``'s cost: TVM's tensor intrinsics in seconds.

TVM 0.27's ``T.prim_func`` calls ``inspect.stack()`` for every function it parses (to find the
variables a closure captures and whether the function sits in an ``@I.ir_module`` class). For
each frame of the stack, ``inspect`` looks up the module that defines it, and for frames of
no file (``<frozen importlib._bootstrap>``, ``<string>``) that lookup walks every loaded module
(``inspect.getmodule``): the cost grows with the stack's depth times the process's modules.
``import tvm.s_tir.tensor_intrin`` parses about 500 functions, and MetaSchedule imports it
whenever a tuning task is made (``TuneContext``): measured here, 47 s in a fresh interpreter,
and about 80 s in ``fgq-tvm tune``, before its first candidate.

:func:`cheap_stacks` makes ``inspect.stack`` build its frame records from the frames alone
(file, line, function, and the line's text through ``linecache``, which TVM reads): the same
records, without the lookups. :func:`import_tensor_intrinsics` imports TVM's intrinsics under
it, once, and fgq-tvm's own intrinsics are parsed under it (``intrinsics_x86``, whose import
every compiling command pays, took 5.5 s of ``python -X importtime -m fgq_tvm sweep ...`` on a
2-core Zen 3 host, 0.09 s under it; ``intrinsics_amx`` 4.3 s, 0.18 s).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import linecache
import sys
from collections.abc import Iterator


def _stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack(context)`` of the caller, its lines read through ``linecache`` (one line
    of context at most)."""
    records = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno) if context > 0 else ""
        lines, index = ([line], 0) if line else (None, None)
        records.append(
            inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, lines, index)
        )
        frame = frame.f_back
    return records


@contextlib.contextmanager
def cheap_stacks() -> Iterator[None]:
    """While the block runs, ``inspect.stack`` is :func:`_stack`."""
    original = inspect.stack
    inspect.stack = _stack
    try:
        yield
    finally:
        inspect.stack = original


@functools.cache
def import_tensor_intrinsics() -> None:
    """Import ``tvm.s_tir.tensor_intrin`` (every TVM tensor intrinsic, registered) under
    :func:`cheap_stacks`; MetaSchedule's tuning tasks and the CUDA schedules need it."""
    with cheap_stacks():
        import tvm.s_tir.tensor_intrin  # noqa: F401 (registers the intrinsics)
