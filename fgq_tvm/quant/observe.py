"""Watching modules while a model runs calibration batches."""

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
