"""fgq-tvm: compile PyTorch CNNs into fine-grained ternary (FGQ) native modules with TVM."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runtime import CompiledModel

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def load(
    path: str | os.PathLike, threads: int | None = None, device: str | None = None
) -> CompiledModel:
    """Load a module written by ``fgq-tvm compile`` to run with ``threads`` threads (default:
    ``TVM_NUM_THREADS`` where set, else one per CPU core) on ``device`` (``"cpu"`` or
    ``"cuda"``; default: the one its target names). See :func:`fgq_tvm.runtime.load`.

    The runtime is imported on the first call, so ``import fgq_tvm`` stays light.
    """
    from .runtime import load as load_module

    return load_module(path, threads, device)
