"""Watching one module's inputs while a model runs calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn


class _Reached(Exception):
    """Ends a forward pass once the watched module has been given its input."""


def observe_inputs(
    model: nn.Module,
    module: nn.Module,
    batches: Iterable[torch.Tensor],
    observe: Callable[[torch.Tensor], None],
) -> int:
    """Run ``model`` on each batch until ``module`` is called, and pass its first input to
    ``observe``; the rest of each forward pass is skipped. Returns the number of batches that
    reached ``module``.

    Only the first call of ``module`` in a forward pass is observed.
    """
    reached = 0

    def stop(_module, args):
        nonlocal reached
        observe(args[0].detach())
        reached += 1
        raise _Reached

    handle = module.register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for batch in batches:
                with contextlib.suppress(_Reached):
                    model(batch)
    finally:
        handle.remove()
    return reached
