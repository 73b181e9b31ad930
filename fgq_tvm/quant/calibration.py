"""Activation calibration: the input range of each quantized layer and its quantizer.

Three range estimators:

* ``"max"``: the smallest and the largest input value seen over all batches.
* ``"percentile"``: for each batch (each call of the layer) the lower and upper ``p``-th
  percentiles of that call's input (nearest rank, computed with ``torch.kthvalue``), averaged over
  the calls. Memory stays bounded by one activation tensor, however many batches are run; the
  cost is that the estimate depends somewhat on the batch size. Each per-batch percentile lies
  inside that batch's [min, max], so the estimate always lies inside the ``"max"`` range.
* ``"mse"``: the clipping range whose quantizer (at the layer's activation bits) has the least
  mean squared error on the inputs seen: the ``"max"`` range scaled by each of
  :data:`MSE_FRACTIONS` is tried on a fixed-seed sample of at most :data:`MSE_SAMPLE` input
  values per call. Clipping a few outliers buys finer steps for every other value, which
  matters most at 4 bits; the estimate always lies inside the ``"max"`` range.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from ..errors import FGQError
from .layers import ActQuant

CalibrationMethod = Literal["max", "percentile", "mse"]
METHODS = ("max", "percentile", "mse")
MSE_FRACTIONS = torch.linspace(0.05, 1.0, 96)
MSE_SAMPLE = 1 << 16


class _RangeObserver:
    """Accumulates the range of the tensors passed to :meth:`observe`."""

    def __init__(self, method: CalibrationMethod, percentile: float, bits: int = 8) -> None:
        self.method = method
        self.percentile = percentile
        self.bits = bits
        self.calls = 0
        self.lo = 0.0 if method == "percentile" else math.inf
        self.hi = 0.0 if method == "percentile" else -math.inf
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1).float()
        if flat.numel() == 0:
            return
        self.calls += 1
        if self.method in ("max", "mse"):
            lo, hi = torch.aminmax(flat)
            self.lo, self.hi = min(self.lo, lo.item()), max(self.hi, hi.item())
            if self.method == "mse":
                count = min(MSE_SAMPLE, flat.numel())
                picked = torch.randperm(flat.numel(), generator=self.generator)[:count]
                self.samples.append(flat[picked])
            return
        upper_rank = min(flat.numel(), max(1, math.ceil(self.percentile / 100 * flat.numel())))
        self.lo += torch.kthvalue(flat, flat.numel() + 1 - upper_rank).values.item()
        self.hi += torch.kthvalue(flat, upper_rank).values.item()

    def range(self) -> tuple[float, float]:
        if self.method == "max":
            return self.lo, self.hi
        if self.method == "mse":
            return _least_squares_range(torch.cat(self.samples), self.lo, self.hi, self.bits)
        return self.lo / self.calls, self.hi / self.calls


def _least_squares_range(values: torch.Tensor, lo: float, hi: float, bits: int):
    """The range among ``[lo, hi]`` scaled by :data:`MSE_FRACTIONS` whose quantizer
    (:func:`make_act_quant`) rounds ``values`` with the least squared error."""
    signed = lo < 0
    extent = max(-lo, abs(hi)) if signed else hi
    if extent <= 0:
        return lo, hi
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    errors = []
    for fraction in MSE_FRACTIONS.tolist():
        scale = fraction * extent / qmax
        quantized = torch.clamp(torch.round(values / scale), qmin, qmax) * scale
        errors.append(float(torch.sum((values - quantized) ** 2)))
    best = float(MSE_FRACTIONS[int(np.argmin(errors))]) * extent
    return (max(lo, -best), min(hi, best)) if signed else (min(lo, best), best)


def calibrate_inputs(
    model: nn.Module,
    layer_names: list[str],
    batches: Iterable[torch.Tensor],
    method: CalibrationMethod = "max",
    percentile: float = 99.99,
    bits: Mapping[str, int] | None = None,
) -> dict[str, tuple[float, float]]:
    """Record the input range of the named modules while the model runs the batches.

    The model runs in eval mode under ``torch.no_grad``; forward pre-hooks observe the first
    positional input of each named module. The model's train/eval mode is restored afterwards.

    Parameters
    ----------
    model
        The network.
    layer_names
        Module paths (``layer1.0.conv1``) of the layers to observe.
    batches
        Model inputs; at least one.
    method
        ``"max"`` or ``"percentile"`` (see the module docstring).
    percentile
        Upper percentile in (0, 100] for ``"percentile"``; the lower bound uses ``100 - p``.
    bits
        ``name -> activation bits`` of every named layer, for ``"mse"``.

    Returns
    -------
    dict
        ``name -> (lo, hi)`` for every named layer that was called; layers that the batches never
        reach are missing.
    """
    if method not in METHODS:
        raise FGQError(f"unknown calibration method {method!r}: use {', '.join(METHODS)}")
    if not 0 < percentile <= 100:
        raise FGQError(f"calibration percentile {percentile} is out of range (0, 100]")
    if method == "mse" and (bits is None or not set(layer_names) <= set(bits)):
        raise FGQError("mse calibration needs the activation bits of every layer")
    observers = {
        name: _RangeObserver(method, percentile, bits[name] if bits else 8) for name in layer_names
    }
    handles = [
        model.get_submodule(name).register_forward_pre_hook(_observe_input(observer))
        for name, observer in observers.items()
    ]
    was_training = model.training
    model.eval()
    try:
        batch_count = _run(model, batches)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batch_count == 0:
        raise FGQError("calibration needs at least one input batch")
    return {name: obs.range() for name, obs in observers.items() if obs.calls > 0}


def make_act_quant(lo: float, hi: float, bits: int) -> ActQuant:
    """The activation quantizer for inputs in ``[lo, hi]``.

    Signed iff ``lo < 0``: then ``scale = max(|lo|, |hi|) / (2^(bits-1) - 1)``; otherwise
    ``scale = hi / (2^bits - 1)``. The scale is a float32 value (held as a Python float). A zero
    range (all inputs zero) gets scale 1.0, which quantizes those inputs to 0.

    Parameters
    ----------
    lo, hi
        The calibrated input range.
    bits
        Activation bits (at least 2).

    Returns
    -------
    ActQuant
        The quantizer.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise FGQError(f"activation range [{lo}, {hi}] is not finite")
    if bits < 2:
        raise FGQError(f"activation bits must be at least 2, got {bits}")
    signed = lo < 0
    extent, levels = (max(-lo, abs(hi)), 2 ** (bits - 1) - 1) if signed else (hi, 2**bits - 1)
    scale = float(np.float32(extent / levels))
    return ActQuant(scale=scale if scale > 0 else 1.0, bits=bits, signed=signed)


def _observe_input(observer: _RangeObserver):
    def hook(module: nn.Module, args: tuple) -> None:
        observer.observe(args[0])

    return hook


def _run(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    count = 0
    with torch.no_grad():
        for batch in batches:
            model(batch)
            count += 1
    return count
