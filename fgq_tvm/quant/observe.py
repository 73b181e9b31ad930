"""Watching modules while a model runs calibration batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn


class _Reached(Exception):
    """Ends a forward pass once every watched module has been given its input."""


def observe_inputs(
    model: nn.Module,
    observers: Mapping[nn.Module, Callable[[torch.Tensor], None]],
    batches: Iterable[torch.Tensor],
) -> int:
    """Run ``model`` on each batch until every module of ``observers`` has been called, and
    pass each module's first input to its observer; the rest of each forward pass is skipped.
    Returns the number of batches that reached every module.

    Only the first call of a module in a forward pass is observed.
    """
    reached, pending = 0, set()

    def watch(module, args):
        nonlocal reached
        if module not in pending:
            return
        observers[module](args[0].detach())
        pending.discard(module)
        if not pending:
            reached += 1
            raise _Reached

    handles = [module.register_forward_pre_hook(watch) for module in observers]
    try:
        with torch.no_grad():
            for batch in batches:
                pending = set(observers)
                with contextlib.suppress(_Reached):
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return reached


def run_hooked(
    model: nn.Module,
    batch: torch.Tensor,
    modules: Iterable[nn.Module],
    hook: Callable,
    *,
    pre: bool,
) -> None:
    """Run ``model`` on ``batch`` without gradients with ``hook`` on each of ``modules``: a
    forward pre-hook (``hook(module, args)``) if ``pre``, else a forward hook (``hook(module,
    args, output)``, which may replace the output). The hooks are removed afterwards."""
    register = "register_forward_pre_hook" if pre else "register_forward_hook"
    handles = [getattr(module, register)(hook) for module in modules]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
